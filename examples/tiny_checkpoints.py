"""Writes a tiny random-weight checkpoint for each of the five model files into one folder, in the published
file layout (config.json, model.safetensors, tokenizer.json, the processor and chat-template files),
and prints a command line that runs each file on its checkpoint, offline, in seconds:

    python examples/tiny_checkpoints.py tiny/

The weights are random, so the answers are random tokens: the checkpoints let you try every flag, the
--explain shapes, --chat and --batch-input without the gigabytes of a real download. They need the test
requirements (`pip install -r requirements-dev.txt`): tests/tiny.py builds them with transformers, the
reference the tests compare against.
"""

import argparse
import contextlib
import io
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

ASK = {  # what each command asks; PaliGemma takes a task prefix
    "qwen2_vl": "--image examples/grace_hopper.jpg --prompt 'Describe this image.'",
    "paligemma": "--image examples/grace_hopper.jpg --prompt 'caption en'",
    "llava_onevision": "--image examples/grace_hopper.jpg --prompt 'What is shown?'",
    "video_llava": "--image examples/grace_hopper.jpg --prompt 'What is shown?'",
    "perception_lm": "--image examples/grace_hopper.jpg --prompt 'Describe it.' --max-num-tiles 4",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the folder to write the five checkpoints into (created if missing)")
    out = Path(ap.parse_args().out)
    try:
        import tiny
    except ImportError as e:
        sys.exit(f"error: {e}: install the test requirements first: pip install -r requirements-dev.txt")
    tiny.torchvision_for_reference()
    print(f"writing five tiny random checkpoints into {out}/ (random weights: the answers are random tokens)")
    for name in ASK:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            built = getattr(tiny, f"build_{name}")(out / "build")["hub"]
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(built, out / name)
        print(f"  python {name}.py --model {out / name} {ASK[name]} --max-new-tokens 8 --device cpu")
    shutil.rmtree(out / "build")


if __name__ == "__main__":
    main()
