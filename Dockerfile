# The raymoe image: Ray 2.60 with CUDA, a CUDA build of torch, and raymoe with its Serve extras; the KubeRay
# manifests (cluster_configs/kuberay_rayjob.yaml, cluster_configs/kuberay_rayservice.yaml) run it.
#
# Build it from the repository root and push it to a registry your Kubernetes cluster pulls from, then put that
# name in the manifests' `image:` fields (they say raymoe:0.1.0):
#
#   docker build -t raymoe:0.1.0 .
#   docker tag raymoe:0.1.0 <registry>/raymoe:0.1.0 && docker push <registry>/raymoe:0.1.0
#
# CPU-only nodes: docker build --build-arg BASE=rayproject/ray:2.60.0-py311-cpu \
#                              --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t raymoe:0.1.0-cpu .
#
# The code and cluster_configs/ live in the image at /home/ray/raymoe: jobs need no working_dir upload.
ARG BASE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

WORKDIR /home/ray/raymoe
# torch first, from the CUDA index (raymoe asks only for torch>=2.4, so its install keeps this build)
RUN pip install --no-cache-dir torch --index-url ${TORCH_INDEX}
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users raymoe ./raymoe
RUN pip install --no-cache-dir ".[serve]"
COPY --chown=ray:users cluster_configs ./cluster_configs
