"""Import-time check of an environment for this kit: the first step of bench/gpu_check.sh.

    python3 bench/import_check.py [--json FILE]

Imports each package of requirements.txt and the kit's optional pieces, printing its version and
where it comes from (the carried wheels on PYTHONPATH, or the image); imports every entrep module and
the entry scripts; checks the torch, torchvision, numpy, peft, accelerate and open_clip APIs the kit
calls. A missing package or API fails here, by name, before any model is built. Exit 1 on any failure.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import inspect
import json
import os
import pkgutil
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODULE = {"open-clip-torch": "open_clip", "scikit-learn": "sklearn", "pyyaml": "yaml", "pillow": "PIL",
          "faiss-cpu": "faiss"}
OPTIONAL = ["tensorboard", "faiss-cpu"]  # requirements-dev.txt: train.log_with=tensorboard, infer.search=faiss-*
SHOWN = ["transformers", "timm", "tokenizers", "huggingface-hub"]  # not the kit's, but open_clip/peft import them


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names() -> list[str]:
    names = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.append(norm(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]))
    return names


def origin(module) -> str:
    f = getattr(module, "__file__", None) or ""
    carried = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if any(Path(f).resolve().is_relative_to(Path(p).resolve()) for p in carried):
        return "carried"
    return "image"


def version(dist: str, module) -> str:
    for d in (dist, MODULE.get(dist, dist)):
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            pass
    return str(getattr(module, "__version__", "?"))


def check_apis() -> list[tuple[str, str | None]]:
    """(what, None if present else why not) for each third-party API the kit calls that came late."""
    def torch_load_kwargs():
        import torch
        params = inspect.signature(torch.load).parameters
        missing = [k for k in ("weights_only", "mmap") if k not in params]
        assert not missing, f"torch.load lacks {missing}"

    def sdpa():
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        for b in ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            getattr(SDPBackend, b)

    def oom():
        import torch
        assert issubclass(torch.OutOfMemoryError, RuntimeError)

    def flops():
        from torch.utils.flop_counter import FlopCounterMode  # noqa: F401

    def compile_():
        import torch
        assert callable(torch.compile)

    def v2():
        from torchvision.transforms import v2  # noqa: F401
        v2.Compose, v2.Normalize, v2.Resize, v2.ToDtype  # noqa: B018

    def bitwise_count():
        import numpy as np
        assert int(np.bitwise_count(np.uint8(255))) == 8

    def peft_target_parameters():  # inference loads every fold's adapter onto one base: peft >= 0.20
        import peft
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = nn.MultiheadAttention(8, 2)

            def forward(self, x):
                return self.attn(x, x, x)[0]

        config = lambda: peft.LoraConfig(r=2, target_parameters=["attn.in_proj_weight"])  # noqa: E731
        model = peft.get_peft_model(Block(), config())
        model.add_adapter("fold1", config())
        model.set_adapter("fold1")
        model(torch.zeros(3, 1, 8))

    def dynamo_plugin():
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin
        TorchDynamoPlugin(backend="inductor", mode="default")
        DistributedDataParallelKwargs(find_unused_parameters=True)
        for m in ("gather_for_metrics", "autocast", "unwrap_model", "prepare"):
            assert hasattr(Accelerator, m), f"Accelerator.{m}"

    def open_clip_api():
        import open_clip
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: F401
        for f in ("create_model", "get_tokenizer", "add_model_config", "list_models", "get_model_config",
                  "list_pretrained_tags_by_model", "get_pretrained_cfg"):
            assert callable(getattr(open_clip, f)), f"open_clip.{f}"

    checks = {"torch.load(weights_only=, mmap=)": torch_load_kwargs,
              "torch.nn.attention.sdpa_kernel, SDPBackend (cuDNN included)": sdpa,
              "torch.OutOfMemoryError": oom, "torch.utils.flop_counter.FlopCounterMode": flops,
              "torch.compile": compile_, "torchvision.transforms.v2": v2, "numpy.bitwise_count": bitwise_count,
              "peft target_parameters, two adapters on one base": peft_target_parameters,
              "accelerate TorchDynamoPlugin(mode=), gather_for_metrics": dynamo_plugin,
              "open_clip factory and constants": open_clip_api}
    out = []
    for what, fn in checks.items():
        try:
            fn()
            out.append((what, None))
        except Exception as e:  # noqa: BLE001 - each API's own failure is the report
            out.append((what, f"{type(e).__name__}: {e}"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the findings here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    report = {"python": platform.python_version(), "executable": sys.executable, "packages": {}, "optional": {},
              "entrep_modules": 0, "failures": []}
    print(f"Python {report['python']} ({sys.executable})")
    for group, names in (("packages", requirement_names()), ("optional", OPTIONAL), ("shown", SHOWN)):
        for dist in names:
            mod = MODULE.get(dist, dist.replace("-", "_"))
            try:
                m = importlib.import_module(mod)
                row = {"version": version(dist, m), "from": origin(m)}
            except Exception as e:  # noqa: BLE001 - ImportError, or a broken build's own error
                row = {"error": f"{type(e).__name__}: {e}"}
                if group == "packages":
                    report["failures"].append(f"{dist}: import {mod} failed ({row['error']})")
            report.setdefault(group, {})[dist] = row
            state = row.get("error") if "error" in row else f"{row['version']:<14} {row['from']}"
            print(f"  {dict(packages='kit', optional='opt', shown='dep')[group]} {dist:<18} {state}")
    import torch

    print(f"  torch CUDA {torch.version.cuda}, GPU: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}")
    import entrep

    for info in pkgutil.walk_packages(entrep.__path__, "entrep."):
        if info.name.endswith(".__main__"):
            continue
        try:
            importlib.import_module(info.name)
            report["entrep_modules"] += 1
        except Exception as e:  # noqa: BLE001
            report["failures"].append(f"import {info.name}: {type(e).__name__}: {e}")
    for script in ("train.py", "infer.py", "submit.py", "bench/throughput.py", "bench/gpu_summary.py"):
        spec = importlib.util.spec_from_file_location(f"_check_{Path(script).stem}", ROOT / script)
        try:
            if script != "bench/gpu_summary.py":  # it reads sys.argv at import: compile only
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            else:
                compile((ROOT / script).read_text(), script, "exec")
        except Exception as e:  # noqa: BLE001
            report["failures"].append(f"{script}: {type(e).__name__}: {e}")
    print(f"  entrep: {report['entrep_modules']} modules imported, entry scripts loaded")
    report["apis"] = {}
    for what, why in check_apis():
        report["apis"][what] = why or "ok"
        print(f"  api {what}: {why or 'ok'}")
        if why:
            report["failures"].append(f"API {what}: {why}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    for f in report["failures"]:
        print(f"FAILED {f}")
    if any(" failed (" in f for f in report["failures"]):
        print("  on an offline image, a package it lacks comes as a wheel: bash bench/offline_wheels.sh where a "
              "registry is reachable, then carry .whl/ with the tree (docs/offline.md)")
    print(f"import check: {'ok' if not report['failures'] else str(len(report['failures'])) + ' failure(s)'} "
          f"in {report['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
