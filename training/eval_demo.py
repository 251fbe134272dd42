"""Evaluate a demo-model folder on a fresh toy-world set: the training yardstick.

    python training/eval_demo.py                                  # built-in demo model, 120 clips
    python training/eval_demo.py --model training/checkpoints/x --n 200 --seed 4242
    python training/eval_demo.py --methods hf,none,dycoke         # also through the product's pipeline

Clips are written as h264 mp4 by ``write_dataset`` (seed never used in training), read back
by presentation time at segment centres (``dycoke_cli.video.read_video`` when present), and
answered greedily. ``hf`` = plain ``model.generate`` on the uncompressed video; any other
method name runs ``dycoke_cli.pipeline.answer`` with that compression at the checkpoint's
defaults. Prints the accuracy per question kind (exact match after lowercasing/stripping).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, read_clip  # noqa: E402

from dycoke_cli.models.preprocess import FrameSpec, preprocess_frames  # noqa: E402
from dycoke_cli.toyworld import write_dataset  # noqa: E402
from dycoke_cli.toyworld.events import EVENT_KINDS  # noqa: E402
from dycoke_cli.toyworld.render import KINDS  # noqa: E402


def norm(text: str) -> str:
    return " ".join(text.lower().replace("?", " ").replace(".", " ").split())


class HFAnswerer:
    """Plain transformers: from_pretrained + generate, the uncompressed reference."""

    def __init__(self, folder: Path, frames: int | None):
        from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

        self.model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(folder)
        cfg = self.model.config.vision_config
        self.fspec = FrameSpec.from_pretrained(folder, cfg.image_size)
        grid = -(-(cfg.image_size // cfg.patch_size) // 2)
        self.per_frame = grid * grid
        from dycoke_cli.models.base import ModelDefaults

        self.defaults = ModelDefaults.from_folder(folder)
        self.frames = frames
        self.video_id = self.tok.convert_tokens_to_ids("<video>")

    def encode(self, path: Path):
        from dycoke_cli.video.read import probe_video

        count = self.frames or self.defaults.frames_for(probe_video(path).duration)  # the product's default
        return preprocess_frames(read_clip(path, count), self.fspec)[None]

    @torch.no_grad()
    def answer(self, pix, question: str) -> str:
        prompt = self.tok.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True, tokenize=False)
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        n = pix.shape[1] * self.per_frame + 1
        pos = ids.index(self.video_id)
        ids = ids[:pos] + [self.video_id] * n + ids[pos + 1:]
        out = self.model.generate(input_ids=torch.tensor([ids]), pixel_values_videos=pix, max_new_tokens=32,
                                  do_sample=False)
        return self.tok.decode(out[0, len(ids):], skip_special_tokens=True)


class PipelineAnswerer:
    """The product's path: dycoke_cli.models.loader.load_model + pipeline.answer with one method."""

    def __init__(self, folder: Path, frames: int | None, method: str, dtype: str):
        from dycoke_cli.models.loader import load_model
        from dycoke_cli.options import CompressionOptions

        self.lm = load_model(str(folder), device="cpu", dtype=dtype)
        self.frames = frames
        self.opts = CompressionOptions(method=method)

    def encode(self, path: Path):
        from dycoke_cli.pipeline import encode_video
        from dycoke_cli.video.read import open_clip

        clip = open_clip(path)  # probed once: for the default count and for reading
        return encode_video(self.lm, clip, self.frames or self.lm.default_frames(clip.info))

    def answer(self, enc, question: str) -> str:
        from dycoke_cli.options import SamplingOptions
        from dycoke_cli.pipeline import answer

        return answer(self.lm, enc, question, self.opts, SamplingOptions(max_new_tokens=32)).text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "src" / "dycoke_cli" / "demo_model")
    ap.add_argument("--n", type=int, default=120, help="clips (>= 100 for the targets)")
    ap.add_argument("--seed", type=int, default=20251122, help="dataset seed (never used in training)")
    ap.add_argument("--data", type=Path, default=None, help="dataset folder (default: /tmp/dycoke_eval_<seed>_<n>)")
    ap.add_argument("--methods", default="hf", help="comma list: hf (plain generate) and/or pipeline methods "
                                                   "(none, dycoke, fastv, random, frames)")
    ap.add_argument("--frames", type=int, default=None, help="frames per clip (default: the model's)")
    ap.add_argument("--world", choices=("v1", "v2"), default="v1", help="toy world of the generated set")
    ap.add_argument("--dtype", default="float32", help="pipeline dtype (auto, float32, bfloat16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--show-errors", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = args.data or Path(f"/tmp/dycoke_eval_{args.world}_{args.seed}_{args.n}")
    qa = data / "qa.jsonl"
    if not qa.is_file():
        t = time.time()
        write_dataset(data, args.n, args.seed, world=args.world)
        print(f"wrote {args.n} clips to {data} in {time.time() - t:.1f} s")
    rows = [json.loads(line) for line in qa.read_text().splitlines() if line.strip()]
    by_video: dict[str, list[dict]] = {}
    for r in rows:
        by_video.setdefault(r["video"], []).append(r)

    results = {}
    for method in args.methods.split(","):
        method = method.strip()
        t0 = time.time()
        runner = HFAnswerer(args.model, args.frames) if method == "hf" else \
            PipelineAnswerer(args.model, args.frames, method, args.dtype)
        hits: dict[str, list[int]] = {}
        errors = []
        for video, qs in by_video.items():
            enc = runner.encode(data / video)
            for r in qs:
                got = runner.answer(enc, r["question"])
                ok = norm(got) == norm(r["answer"])
                hits.setdefault(r["kind"], []).append(int(ok))
                if not ok:
                    errors.append((video, r["question"], r["answer"], got))
        acc = {k: float(np.mean(hits[k])) for k in [*KINDS, *EVENT_KINDS] if k in hits}
        acc["overall"] = float(np.mean([x for v in hits.values() for x in v]))
        results[method] = {"accuracy": acc, "n_questions": sum(len(v) for v in hits.values()),
                           "n_clips": len(by_video), "seconds": time.time() - t0}
        print(f"\n[{method}] {len(by_video)} clips, {results[method]['n_questions']} questions, "
              f"{time.time() - t0:.0f} s")
        for k, v in acc.items():
            print(f"  {k:12s} {100 * v:6.1f} %  ({sum(hits[k]) if k in hits else '':>4} / {len(hits[k]) if k in hits else ''})"
                  if k in hits else f"  {k:12s} {100 * v:6.1f} %")
        for e in errors[: args.show_errors]:
            print(f"  x {e[0]}: {e[1]!r} expected {e[2]!r} got {e[3]!r}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
