"""Extend the demo model's training to toy world v2 (several events per clip), keeping v1.

    python training/extend_v2.py --fps 2 --steps 4000 --caption-weight 3   # fresh or resumed run

Starts from the shipped v1 model (``--init``, default src/dycoke_cli/demo_model/), grows the
word vocabulary by the words v2's questions and captions need (the v1 ids stay where they
are; the new rows start at the mean embedding), and trains on a mix of v1 and v2 clips. Frames:
``--frames`` per clip, or with ``--fps`` by the clip's length as the product counts them from
dycoke.json (round(seconds * fps) within [--min-frames, --frames]: a 2-4 s v1 clip gets 4-8, a
6-9 s v2 clip 12-16), one world and one count per batch. ``--ttm-p`` of the steps run the
video tokens through DyCoke's TTM, as the v1 fine-tune did; ``--prune-share`` of those also
prune the KV cache while decoding, teacher-forced as the product decodes
(common.DecodePruning). Held-out v1 and v2 clips (real h264 mp4, read back by presentation
time at full size, then resized) are scored every ``--eval-every`` steps; the best by the lower
of the two overall accuracies (plus a share of v2's captions, of v2 under TTM and, with
``--prune-share``, of v2 under DyCoke) is exported.

Seeded and resumable like train_demo.py (``--ckpt-dir``/last.pt; ``--fresh``); ``--until`` stops
at a step with the schedule of ``--steps``, ``--resume-from`` starts a new folder from another
run's last.pt. training/README.md gives the stages that were run.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, WORDS, DecodePruning, Packer, branch_targets, packed_logits, read_clip  # noqa: E402
from train_demo import (  # noqa: E402
    aux_loss,
    branches_for,
    degrade,
    evaluate,
    make_heldout,
    sample_times,
)

from dycoke_cli.models.preprocess import FrameSpec, preprocess_frames  # noqa: E402
from dycoke_cli.testing.tiny import TinySpec, build_llava_onevision, build_word_tokenizer, save_checkpoint  # noqa: E402
from dycoke_cli.toyworld.events import event_questions, sample_event_spec  # noqa: E402
from dycoke_cli.toyworld.render import COLORS, HEIGHT, SHAPES, WIDTH, render_frames, sample_spec, write_clip  # noqa: E402

# v2's words, appended after v1's so every v1 token keeps its id.
V2_WORDS = sorted({"change", "first", "how", "last", "many", "none", "once", "then", "times", "twice", "when"} - set(WORDS))
ALL_WORDS = list(WORDS) + V2_WORDS
CKPT_DIR = ROOT / "training" / "checkpoints_v2"
OUT_DIR = ROOT / "src" / "dycoke_cli" / "demo_model"
# The shipped v1 model's sizes (training/README.md).
SPEC = TinySpec(image_size=96, patch_size=12, vision_hidden=64, vision_layers=3, vision_heads=2,
                vision_intermediate=256, text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2,
                text_intermediate=384, max_position_embeddings=1024)
BRANCH_LEN = 44


def v2_question_variant(kind: str, question: str, shape: str, rng: np.random.Generator) -> str:
    """A v2 question in a random wording: the noun is the object's own mostly, sometimes "cup"
    whatever the object or "object"; "color" or "colour"; with or without "?"; sometimes
    capitalised (v1's variants, applied to v2's canonical text)."""
    q = question
    if kind != "object":
        r = rng.random()
        noun = shape if r < 0.6 else ("cup" if r < 0.85 else "object")
        q = q.replace(f"the {shape}", f"the {noun}")
    if rng.random() < 0.3:
        q = q.replace("color", "colour")
    if rng.random() < 0.25:
        q = q.rstrip("?.")
    if rng.random() < 0.2:
        q = q[0].upper() + q[1:]
    return q


def v2_branches(spec, packer: Packer, k: int, rng: np.random.Generator):
    """k branches of a v2 clip: the caption always, then the other questions in random order
    (each applicable kind gets a slot before any repeats), padded with a second caption."""
    qs = event_questions(spec)
    caption = [q for q in qs if q[0] == "caption"]
    rest = [q for q in qs if q[0] != "caption"]
    order = rng.permutation(len(rest))
    chosen = caption + [rest[i] for i in order][: k - 1]
    while len(chosen) < k:
        chosen.append(caption[0])
    ids, labels = zip(*(packer.branch(v2_question_variant(kd, q, spec.shape, rng), a) for kd, q, a in chosen))
    return list(ids), list(labels), [c[0] for c in chosen]


def draw(rng: np.random.Generator, world: str):
    return sample_event_spec(rng, variety=True) if world == "v2" else sample_spec(rng, variety=True)


def make_example(rng: np.random.Generator, spec, world: str, T: int, fspec: FrameSpec, grid: int):
    from PIL import Image

    times = sample_times(spec, T, rng)
    frames, masks = render_frames(spec, times, with_masks=True)
    frames = degrade(frames, rng)
    pix = preprocess_frames(frames, fspec)
    cov = np.stack([np.asarray(Image.fromarray(m).resize((grid, grid), Image.BOX), dtype=np.float32) for m in masks]) / 255.0
    centres = np.array([spec.center_at(t) for t in times])
    xy = np.stack([centres[:, 0] / WIDTH * 2 - 1, centres[:, 1] / HEIGHT * 2 - 1], axis=1)
    if world == "v2":
        col = [COLORS.index(spec.colors[spec.segment_at(t)]) for t in times]
    else:
        col = [COLORS.index(spec.colors[spec.color_index_at(t)]) for t in times]
    aux = {
        "shape": torch.full((T,), SHAPES.index(spec.shape), dtype=torch.long),
        "color": torch.tensor(col, dtype=torch.long),
        "xy": torch.from_numpy(xy).float(),
        "cov": torch.from_numpy(cov.reshape(T, -1)).float(),
    }
    return pix, aux, spec


def make_batch(step: int, args, packer: Packer, fspec: FrameSpec, grid: int):
    """(pixels, aux targets, branch ids [N, k, B], labels [N, k, B], caption branches [N, k] bool)."""
    rng = np.random.default_rng([args.seed, step])
    pix, aux, ids, labels, captions = [], [], [], [], []
    if args.fps:  # frames by length: one world and one frame count per batch (stacked pixels)
        worlds = ["v1" if rng.random() < args.v1_share else "v2"] * args.batch
    else:
        worlds = ["v1" if j < round(args.batch * args.v1_share) else "v2" for j in range(args.batch)]
    T = None
    for world in worlds:
        spec = draw(rng, world)
        if args.fps:
            T = T or frames_for(args, spec.duration)
            while frames_for(args, spec.duration) != T:
                spec = draw(rng, world)
        p, a, spec = make_example(rng, spec, world, T or args.frames, fspec, grid)
        if world == "v2":
            b_ids, b_labels, kinds = v2_branches(spec, packer, args.branches, rng)
        else:
            b_ids, b_labels, kinds = branches_for(spec, packer, args.branches, rng)
        pix.append(p)
        aux.append(a)
        ids.append(b_ids)
        labels.append(b_labels)
        captions.append([kind == "caption" for kind in kinds])
    aux = {key: torch.stack([a[key] for a in aux]) for key in aux[0]}
    return torch.stack(pix), aux, torch.tensor(ids), torch.tensor(labels), torch.tensor(captions)


def weighted_lm_loss(logits, targets, captions, decision_ids, decision_weight: float, caption_weight: float):
    """train_demo's loss (answer tokens and EOS; the caption's decision tokens weigh
    ``decision_weight``) with every token of a caption branch weighing ``caption_weight`` more:
    a v2 caption is right only when every segment and the end are, the hardest answer here."""
    flat_t = targets.reshape(-1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_t, ignore_index=-100, reduction="none")
    w = (flat_t != -100).float()
    w = torch.where(torch.isin(flat_t, decision_ids), w * decision_weight, w)
    w = w * (1 + (caption_weight - 1) * captions[..., None].expand_as(targets).reshape(-1).float())
    return (ce * w).sum() / w.sum()


def frames_for(args, seconds: float) -> int:
    """Frames for a clip of ``seconds``: with --fps, the product's rule (ModelDefaults.frames_for,
    what dycoke.json's fps/min_frames/max_frames give); else --frames."""
    return defaults_of(args).frames_for(seconds) if args.fps else args.frames


def defaults_of(args):
    from dycoke_cli.models.base import ModelDefaults

    return ModelDefaults(num_frames=args.frames, fps=args.fps or None, min_frames=args.min_frames,
                         max_frames=args.frames if args.fps else None)


def make_heldout_v2(n: int, seed: int, args, packer: Packer, fspec: FrameSpec, folder: Path):
    """v2 held-out clips written as h264 mp4 and read back; every question in canonical wording."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pix, ids, labels, kinds = [], [], [], []
    for i in range(n):
        spec = sample_event_spec(rng, variety=True)
        path = write_clip(spec, folder / f"{i:04d}.mp4", crf=int(rng.integers(18, 30)))
        pix.append(preprocess_frames(read_clip(path, frames_for(args, spec.duration)), fspec))
        qs = event_questions(spec)
        b = [packer.branch(q, a) for _, q, a in qs]
        ids.append([x[0] for x in b])
        labels.append([x[1] for x in b])
        kinds.append([k for k, _, _ in qs])
    return pix, ids, labels, kinds


def grown_layer_map(n_old: int, n_new: int) -> tuple[dict[int, int], list[int]]:
    """Where the ``n_old`` language-model layers go when ``n_new - n_old`` are inserted evenly
    between them (one after every n_old // grow old layers): ({old: new index}, [new layers])."""
    grow = n_new - n_old
    stride = max(1, n_old // max(grow, 1))
    where, added, j = {}, [], 0
    for i in range(n_old):
        where[i] = j
        j += 1
        if len(added) < grow and (i + 1) % stride == 0:
            added.append(j)
            j += 1
    added += list(range(j, n_new))
    return where, added


def build(args):
    """The init model with the vocabulary grown to v2's words (new rows: the mean embedding)
    and, with ``--grow-layers``, language-model layers inserted that start as the identity
    (their attention output and MLP down projections are zero, so the model's function is
    unchanged at step 0)."""
    import re
    from dataclasses import replace

    from transformers import LlavaOnevisionForConditionalGeneration

    from dycoke_cli.models.base import quiet_transformers

    tokenizer = build_word_tokenizer(ALL_WORDS)
    with quiet_transformers():
        init = LlavaOnevisionForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    n_old = init.config.text_config.num_hidden_layers
    spec = replace(SPEC, text_layers=n_old + args.grow_layers)
    model = build_llava_onevision(tokenizer, spec, seed=args.seed)
    own = model.state_dict()
    where, added = grown_layer_map(n_old, spec.text_layers)
    layer = re.compile(r"(.*\.language_model\.(?:.*\.)?layers\.)(\d+)(\..*)")

    def moved(name: str) -> str:
        m = layer.match(f".{name}")
        return f"{m[1]}{where[int(m[2])]}{m[3]}"[1:] if m else name

    state = {moved(name): value for name, value in init.state_dict().items()}
    for name, value in own.items():
        m = layer.match(f".{name}")
        if m and int(m[2]) in added:
            zero = name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight"))
            state[name] = torch.zeros_like(value) if zero else value.clone()
    for name, value in state.items():
        if own[name].shape != value.shape:  # the embedding and the output head: v1 rows first
            rows = value.shape[0]
            grown = own[name].clone()
            grown[:rows] = value
            grown[rows:] = value.mean(0, keepdim=True)
            state[name] = grown
    model.load_state_dict(state, strict=True)
    fspec = FrameSpec.from_pretrained(args.init, SPEC.image_size)
    grid = math.ceil(SPEC.image_size // SPEC.patch_size / 2)
    packer = Packer(tokenizer, args.frames * grid * grid + 1, branch_len=BRANCH_LEN)
    torch.manual_seed(args.seed + 1)
    aux_head = torch.nn.Sequential(torch.nn.LayerNorm(SPEC.text_hidden),
                                   torch.nn.Linear(SPEC.text_hidden, len(SHAPES) + len(COLORS) + 2 + 1))
    return tokenizer, model, fspec, grid, packer, aux_head


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def export(model, tokenizer, fspec, args, path: Path):
    frames = {"num_frames": args.frames}
    if args.fps:  # by length: the model tells a 2-4 s v1 clip from a 6-9 s v2 clip by its frame count
        frames.update(fps=args.fps, min_frames=args.min_frames, max_frames=args.frames)
    save_checkpoint(model, tokenizer, path, fspec, {
        **frames, "prune_layer": model.config.text_config.num_hidden_layers // 2, "ttm_k": 0.7, "prune_p": 0.7,
        "caption_prompt": "describe the video.",
    })
    print(f"wrote {path} ({(path / 'model.safetensors').stat().st_size / 1e6:.2f} MB weights)", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", type=Path, default=OUT_DIR, help="the v1 model folder to start from")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--v1-share", type=float, default=0.375, help="share of each batch's clips from world v1")
    ap.add_argument("--branches", type=int, default=8)
    ap.add_argument("--frames", type=int, default=16, help="frames per clip; with --fps, the most")
    ap.add_argument("--fps", type=float, default=0.0,
                    help="frames by the clip's length: round(seconds * fps) in [--min-frames, --frames]")
    ap.add_argument("--min-frames", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--aux-weight", type=float, default=0.3)
    ap.add_argument("--ttm-p", type=float, default=0.5)
    ap.add_argument("--prune-share", type=float, default=0.0,
                    help="share of the TTM steps that also prune the KV cache while decoding, as the product "
                         "does (teacher-forced; the budget and the rule drawn per step)")
    ap.add_argument("--decision-weight", type=float, default=3.0,
                    help="loss weight of the caption tokens that decide what comes next (moves/stays/turns/,/then)")
    ap.add_argument("--decision-tokens", default="moves stays turns , then",
                    help="the caption tokens that weigh --decision-weight (space-separated; <eos> is the end)")
    ap.add_argument("--grow-layers", type=int, default=0,
                    help="insert this many language-model layers into the init model, starting as the identity")
    ap.add_argument("--aux-from", type=Path, default=None, help="a checkpoint (.pt) whose probe head to start from")
    ap.add_argument("--caption-weight", type=float, default=1.0,
                    help="loss weight of caption branches' tokens (the second stage used 3)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--heldout-v1", type=int, default=30)
    ap.add_argument("--heldout-v2", type=int, default=60)
    ap.add_argument("--heldout-seed", type=int, default=880011)
    ap.add_argument("--max-minutes", type=float, default=0)
    ap.add_argument("--until", type=int, default=0, help="stop at this step (the schedule still runs to --steps)")
    ap.add_argument("--resume-from", type=Path, default=None,
                    help="start from another run's last.pt (its weights, optimiser and step; best reset)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-dir", type=Path, default=CKPT_DIR)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer, model, fspec, grid, packer, aux_head = build(args)
    prune_layer = model.config.text_config.num_hidden_layers // 2  # what export writes to dycoke.json
    print(f"vocab {len(tokenizer)} (+{len(V2_WORDS)}: {' '.join(V2_WORDS)}); {args.frames} frames -> "
          f"{packer.V} video tokens", flush=True)
    params = list(model.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    last, best_path = args.ckpt_dir / "last.pt", args.ckpt_dir / "best.pt"
    step, best, history = 0, {"score": -1.0}, []
    if args.resume_from is not None and not last.exists():
        st = torch.load(args.resume_from, weights_only=False)
        st["best"] = {"score": -1.0}  # scores of another frame regime do not compare
        torch.save(st, last)
    if last.exists() and not args.fresh:
        st = torch.load(last, weights_only=False)
        model.load_state_dict(st["model"])
        aux_head.load_state_dict(st["aux"])
        opt.load_state_dict(st["opt"])
        step, best, history = st["step"], st["best"], st.get("history", [])
        print(f"resumed at step {step} (best {best})", flush=True)
    model.train()
    decision = [tokenizer.eos_token if w == "<eos>" else w for w in args.decision_tokens.split()]
    decision_ids = torch.tensor(tokenizer.convert_tokens_to_ids(decision))
    if args.aux_from is not None and step == 0:
        aux_head.load_state_dict(torch.load(args.aux_from, weights_only=False)["aux"])
    v1_args = argparse.Namespace(frames=args.frames)
    t_h = time.time()
    held_v1 = make_heldout(args.heldout_v1, args.heldout_seed, v1_args, packer, fspec, args.ckpt_dir / "heldout_v1",
                           frames_for=lambda seconds: frames_for(args, seconds))
    held_v2 = make_heldout_v2(args.heldout_v2, args.heldout_seed + 1, args, packer, fspec, args.ckpt_dir / "heldout_v2")
    print(f"held-out: {args.heldout_v1} v1 + {args.heldout_v2} v2 h264 clips ({time.time() - t_h:.0f} s)", flush=True)

    def save(path):
        torch.save({"model": model.state_dict(), "aux": aux_head.state_dict(), "opt": opt.state_dict(),
                    "step": step, "best": best, "history": history, "args": {k: str(v) for k, v in vars(args).items()}}, path)

    def run_eval():
        nonlocal best
        r1, r2 = evaluate(model, packer, held_v1), evaluate(model, packer, held_v2)
        t2 = evaluate(model, packer, held_v2, ttm_k=0.7)
        res = {"step": step, "v1": r1, "v2": r2, "v2_ttm": t2,
               "score": min(r1["overall"], r2["overall"]) + 0.25 * r2["caption"] + 0.25 * t2["overall"]}
        names = ["v1", "v2", "v2_ttm"]
        if args.prune_share:  # DyCoke at the product's defaults: its v2 overall and captions weigh 0.25 each
            d2 = evaluate(model, packer, held_v2, ttm_k=0.7, prune=DecodePruning(layer=prune_layer))
            res["v2_dycoke"] = d2
            res["score"] += 0.25 * d2["overall"] + 0.25 * d2["caption"]
            names.append("v2_dycoke")
        history.append(res)
        for name in names:
            print(f"EVAL step {step} {name}: " + " ".join(f"{k} {v:.3f}" for k, v in res[name].items()), flush=True)
        if res["score"] >= best["score"]:
            best = {"score": res["score"], "step": step}
            save(best_path)
            print(f"  new best at step {step} (score {res['score']:.3f})", flush=True)

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    t0 = time.time()
    ema = None
    try:
        if step == 0:
            run_eval()
        while step < (args.until or args.steps) and not stop["now"]:
            ts = time.time()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args)
            pix, aux, ids, labels, captions = make_batch(step, args, packer, fspec, grid)
            td = time.time() - ts
            ttm_k = None
            if np.random.default_rng([args.seed, 7, step]).random() < args.ttm_p:
                ttm_k = float(np.random.default_rng([args.seed, 8, step]).choice([0.5, 0.6, 0.7, 0.7, 0.8]))
            prune = None
            pick = np.random.default_rng([args.seed, 9, step])
            if ttm_k is not None and pick.random() < args.prune_share:
                prune = DecodePruning(p=float(pick.choice([0.6, 0.7, 0.7, 0.8])), layer=prune_layer,
                                      coverage=float(pick.choice([0.0, 0.5, 0.5, 1.0])))
            logits, feats = packed_logits(model, packer, pix, ids, return_features=True, ttm_k=ttm_k, prune=prune,
                                          decoding=labels != -100)
            lm = weighted_lm_loss(logits, branch_targets(labels), captions, decision_ids, args.decision_weight,
                                  args.caption_weight)
            al, _ = aux_loss(aux_head, feats, aux)
            loss = lm + args.aux_weight * al
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            ema = lm.item() if ema is None else 0.95 * ema + 0.05 * lm.item()
            if step % 10 == 0 or step == 1:
                print(f"step {step:5d} lm {lm.item():.4f} (ema {ema:.4f}) aux {al.item():.3f} lr {lr_at(step - 1, args):.2e} "
                      f"{time.time() - ts:.2f}s/step (data {td:.2f}s) elapsed {(time.time() - t0) / 60:.1f} min", flush=True)
            if step % args.eval_every == 0 or step == args.steps:
                run_eval()
            if step % args.ckpt_every == 0:
                save(last)
            if args.max_minutes and (time.time() - t0) / 60 > args.max_minutes:
                print(f"time budget of {args.max_minutes} min reached at step {step}", flush=True)
                break
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    save(last)
    if history and history[-1]["step"] != step:
        run_eval()
    (args.ckpt_dir / "history.json").write_text(json.dumps(history, indent=1))
    print(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; best {best}", flush=True)
    if not args.no_export:
        model.load_state_dict(torch.load(best_path if best_path.exists() else last, weights_only=False)["model"])
        model.eval()
        export(model, tokenizer, fspec, args, args.out)


if __name__ == "__main__":
    main()
