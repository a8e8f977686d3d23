"""Ray Serve deployments: OpenAI-compatible endpoints over a continuous-batching engine.

- `app.build_app(args)`: the Serve application (``serve run cluster_configs/serve_local.yaml``, ``raymoe serve``)
- `ingress.OpenAIIngress`: FastAPI routes (/v1/models, /v1/completions, /v1/chat/completions, /healthz)
- `server.LLMServer`: one engine per replica; user_config reload, health checks, graceful shutdown
- `engine.Engine`: continuous batching (the platform's decode loop) with a KV cache, usable in-process without Ray
- `engine_config.EngineConfig`: the engine's typed settings (``raymoe serve`` flags, ``ServeArgs.engine``)
- `proc_engine.ProcessEngine`: the Engine in a child process of the replica (the default in Serve)
- `ep_runner.EPRunner`: the model over a group of `raymoe.actors.inference_shard.InferenceShard` actors
- `fake_engine.FakeEngine`: the same contract without a model (tests, load tests)
- `protocol`: the engine contract; `openai_api`: request/response shapes; `metrics`: Ray metrics

Importing this package (or `engine`, `protocol`, `openai_api`) does not import Ray.
"""
