"""raymoe.platform must stay pure PyTorch: importing any of its modules never imports ray."""

import pkgutil
import subprocess
import sys

import raymoe.platform


def _platform_modules():
    return sorted(m.name for m in pkgutil.walk_packages(raymoe.platform.__path__, "raymoe.platform."))


def test_platform_never_imports_ray():
    mods = _platform_modules()
    assert "raymoe.platform.model" in mods and "raymoe.platform.moe.layer" in mods
    code = (
        "import sys, importlib\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.'))\n"
        "assert not bad, bad\n"
        "print('ok', len(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_importing_raymoe_is_light():
    code = "import sys, raymoe; assert 'torch' not in sys.modules and 'ray' not in sys.modules; print(raymoe.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_stdlib_platform_is_not_shadowed():
    code = "import platform, raymoe.platform; print(platform.system())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # e.g. 'Linux'
