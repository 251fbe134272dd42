"""Train the built-in demo model (`--model demo`) from scratch on the toy world, on CPU.

    python training/train_demo.py --steps 3000            # fresh or resumed run
    python training/train_demo.py --steps 3000 --max-minutes 55

A LlavaOnevisionForConditionalGeneration (SigLIP-style vision tower, Qwen2-style language
model, word-level tokenizer) learns to answer the toy world's questions from rendered clips.
See training/README.md for the recipe, the sizes and the measured results.

Seeded (the batch of step s depends only on --seed and s, so a resumed run sees the same
data), resumable (training/checkpoints/last.pt every --ckpt-every steps, best.pt by held-out
accuracy), progress printed with the loss and a periodic held-out exact-match accuracy per
question kind on clips encoded to h264 and decoded back like the product does. At the end
(or when --max-minutes runs out, or on Ctrl-C) the best checkpoint is written with
``save_checkpoint`` into src/dycoke_cli/demo_model/.
"""

from __future__ import annotations

import argparse
import io
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
from common import ROOT, WORDS, Packer, branch_targets, check_packing, exact_match, packed_logits, read_clip  # noqa: E402

from dycoke_cli.models.preprocess import FrameSpec, preprocess_frames  # noqa: E402
from dycoke_cli.testing.tiny import TinySpec, build_llava_onevision, build_word_tokenizer, save_checkpoint  # noqa: E402
from dycoke_cli.toyworld.render import (  # noqa: E402
    COLORS,
    FPS,
    HEIGHT,
    KINDS,
    SHAPES,
    WIDTH,
    answer_for,
    encode_frames,
    question_text,
    render_frames,
    sample_spec,
    write_clip,
)

CKPT_DIR = ROOT / "training" / "checkpoints"
OUT_DIR = ROOT / "src" / "dycoke_cli" / "demo_model"

# ---------------------------------------------------------------------------------------------
# Data


def sample_times(spec, T: int, rng: np.random.Generator) -> np.ndarray:
    """Times of the frames a reader picks at the centres of T equal segments, snapped to the
    30 fps grid, with occasional +-1 frame jitter (readers differ in duration and rounding)."""
    n = spec.num_frames
    dur = n / FPS if rng.random() < 0.7 else (n - 1) / FPS
    centres = (np.arange(T) + 0.5) * dur / T
    idx = np.clip(np.round(centres * FPS).astype(int) + (rng.integers(-1, 2, size=T) * (rng.random(T) < 0.3)), 0, n - 1)
    return idx / FPS


def degrade(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """h264 (most clips), JPEG or nothing, plus sometimes blur/noise: what decoding a clip
    written by another renderer and encoder looks like."""
    from PIL import Image, ImageFilter

    r = rng.random()
    if r < 0.65:
        buf = io.BytesIO()
        encode_frames(frames, buf, crf=int(rng.integers(16, 36)), preset=str(rng.choice(["ultrafast", "veryfast", "medium"])))
        buf.seek(0)
        import av

        with av.open(buf) as c:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    elif r < 0.85:
        q = int(rng.integers(30, 95))
        out = []
        for f in frames:
            b = io.BytesIO()
            Image.fromarray(f).save(b, "JPEG", quality=q)
            b.seek(0)
            out.append(np.asarray(Image.open(b).convert("RGB")))
        frames = np.stack(out)
    if rng.random() < 0.15:
        rad = float(rng.uniform(0.5, 1.5))
        frames = np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(rad))) for f in frames])
    if rng.random() < 0.15:
        frames = np.clip(frames + rng.normal(0, rng.uniform(1, 5), size=frames.shape), 0, 255).astype(np.uint8)
    return frames


def question_variant(kind: str, spec, rng: np.random.Generator) -> str:
    """The question of a kind in a random wording: the object's own noun mostly, sometimes
    "cup" whatever the object (the tracker's literal wording) or "object"; "color" or
    "colour"; with or without the final mark; sometimes capitalised."""
    r = rng.random()
    noun = spec.shape if r < 0.6 else ("cup" if r < 0.85 else "object")
    q = question_text(kind, noun, "colour" if rng.random() < 0.3 else "color", mark=rng.random() < 0.75)
    if rng.random() < 0.2:
        q = q[0].upper() + q[1:]
    return q


def make_example(rng: np.random.Generator, T: int, fspec: FrameSpec, grid: int, degrade_p: float = 1.0):
    """One clip: pixel values [T, 3, h, w], aux targets and its spec."""
    spec = sample_spec(rng, variety=True)
    times = sample_times(spec, T, rng)
    frames, masks = render_frames(spec, times, with_masks=True)
    if rng.random() < degrade_p:
        frames = degrade(frames, rng)
    pix = preprocess_frames(frames, fspec)
    # Aux targets per frame: shape, current colour, centre (x, y) in [-1, 1]; per token: the
    # fraction of its cell of the frame the object covers.
    from PIL import Image

    cov = np.stack([np.asarray(Image.fromarray(m).resize((grid, grid), Image.BOX), dtype=np.float32) for m in masks]) / 255.0
    centres = np.array([spec.center_at(t) for t in times])
    xy = np.stack([centres[:, 0] / WIDTH * 2 - 1, centres[:, 1] / HEIGHT * 2 - 1], axis=1)
    col = np.array([COLORS.index(spec.colors[spec.color_index_at(t)]) for t in times])
    aux = {
        "shape": torch.full((T,), SHAPES.index(spec.shape), dtype=torch.long),
        "color": torch.from_numpy(col).long(),
        "xy": torch.from_numpy(xy).float(),
        "cov": torch.from_numpy(cov.reshape(T, -1)).float(),
    }
    return pix, aux, spec


def branches_for(spec, packer: Packer, k: int, rng: np.random.Generator):
    """k question branches: every applicable kind once (colour-change clips have no plain
    colour question), the rest drawn at random, each in a random wording."""
    kinds = [kd for kd in KINDS if not (kd == "color" and spec.changes)]
    while len(kinds) < k:  # the caption is the hardest kind: it gets the spare slot
        kinds.append("caption")
    kinds = kinds[:k]
    ids, labels = zip(*(packer.branch(question_variant(kd, spec, rng), answer_for(spec, kd)) for kd in kinds))
    return list(ids), list(labels), kinds


def make_batch(step: int, args, packer: Packer, fspec: FrameSpec, grid: int):
    rng = np.random.default_rng([args.seed, step])
    pix, aux, ids, labels = [], [], [], []
    for _ in range(args.batch):
        p, a, spec = make_example(rng, args.frames, fspec, grid)
        i, l, _ = branches_for(spec, packer, args.branches, rng)
        pix.append(p)
        aux.append(a)
        ids.append(i)
        labels.append(l)
    aux = {key: torch.stack([a[key] for a in aux]) for key in aux[0]}
    return torch.stack(pix), aux, torch.tensor(ids), torch.tensor(labels)


def make_frame_batch(step: int, args, fspec: FrameSpec, grid: int):
    """Vision pre-training batch: independent single frames (a clip each, at a random time),
    most JPEG-compressed (4:2:0 chroma, like h264), with the per-frame aux targets."""
    from PIL import Image

    rng = np.random.default_rng([args.seed, 10**6 + step])
    frames, masks, shape, color, xy = [], [], [], [], []
    for _ in range(args.pretrain_batch):
        spec = sample_spec(rng, variety=True)
        t = float(rng.uniform(0, spec.duration))
        f, m = render_frames(spec, [t], with_masks=True)
        if rng.random() < 0.75:
            b = io.BytesIO()
            Image.fromarray(f[0]).save(b, "JPEG", quality=int(rng.integers(25, 95)))
            b.seek(0)
            f = np.asarray(Image.open(b).convert("RGB"))[None]
        frames.append(f[0])
        masks.append(m[0])
        shape.append(SHAPES.index(spec.shape))
        color.append(COLORS.index(spec.colors[spec.color_index_at(t)]))
        cx, cy = spec.center_at(t)
        xy.append((cx / WIDTH * 2 - 1, cy / HEIGHT * 2 - 1))
    pix = preprocess_frames(np.stack(frames), fspec)
    cov = np.stack([np.asarray(Image.fromarray(m).resize((grid, grid), Image.BOX), dtype=np.float32) for m in masks]) / 255.0
    aux = {"shape": torch.tensor(shape), "color": torch.tensor(color), "xy": torch.tensor(xy, dtype=torch.float32),
           "cov": torch.from_numpy(cov.reshape(len(frames), -1))}
    return pix, aux


def make_heldout(n: int, seed: int, args, packer: Packer, fspec: FrameSpec, folder: Path, frames_for=None):
    """Held-out clips written as real h264 mp4 and read back at segment centres, with every
    applicable question in canonical wording plus one "cup"/"colour" variant of each.
    ``frames_for(seconds)``: the frames to read from a clip of that length (default: args.frames)."""
    rng = np.random.default_rng(seed)
    pix, ids, labels, kinds = [], [], [], []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        spec = sample_spec(rng, variety=True)
        path = write_clip(spec, folder / f"{i:04d}.mp4", crf=int(rng.integers(18, 30)))
        frames = args.frames if frames_for is None else frames_for(spec.duration)
        pix.append(preprocess_frames(read_clip(path, frames), fspec))
        b_ids, b_labels, b_kinds = [], [], []
        for kd in KINDS:
            if kd == "color" and spec.changes:
                continue
            q = question_text(kd, spec.shape)
            b = packer.branch(q, answer_for(spec, kd))
            b_ids.append(b[0])
            b_labels.append(b[1])
            b_kinds.append(kd)
        ids.append(b_ids)
        labels.append(b_labels)
        kinds.append(b_kinds)
    return pix, ids, labels, kinds


@torch.no_grad()
def evaluate(model, packer: Packer, heldout, ttm_k: float | None = None, prune=None) -> dict:
    """Teacher-forced exact match per question kind (``prune``: common.DecodePruning, with TTM)."""
    model.eval()
    pix, ids, labels, kinds = heldout
    hits: dict[str, list[int]] = {}
    for p, i, l, kd in zip(pix, ids, labels, kinds):
        logits = packed_logits(model, packer, p[None], torch.tensor([i]), ttm_k=ttm_k, prune=prune,
                               decoding=torch.tensor([l]) != -100)
        ok = exact_match(logits, branch_targets(torch.tensor([l])))[0]
        for kind, good in zip(kd, ok.tolist()):
            hits.setdefault(kind, []).append(int(good))
    model.train()
    res = {k: float(np.mean(v)) for k, v in hits.items()}
    res["overall"] = float(np.mean([x for v in hits.values() for x in v]))
    res["min_kind"] = min(res[k] for k in hits)
    return res


# ---------------------------------------------------------------------------------------------
# Model


def build(args):
    tokenizer = build_word_tokenizer(WORDS)
    spec = TinySpec(
        image_size=args.image_size, patch_size=args.patch, vision_hidden=args.vision_hidden,
        vision_layers=args.vision_layers, vision_heads=args.vision_heads,
        vision_intermediate=args.vision_hidden * 4, text_hidden=args.text_hidden,
        text_layers=args.text_layers, text_heads=4, text_kv_heads=2,
        text_intermediate=args.text_hidden * 3, max_position_embeddings=1024,
    )
    model = build_llava_onevision(tokenizer, spec, seed=args.seed)
    fspec = FrameSpec(args.image_size, args.image_size, spec.mean, spec.std)
    grid = math.ceil(args.image_size // args.patch / 2)
    per_frame = grid * grid
    packer = Packer(tokenizer, args.frames * per_frame + 1)
    init_for_scratch(model, args.seed)
    # Training-only probe on the projected, pooled video tokens (never saved with the model).
    torch.manual_seed(args.seed + 1)
    aux_head = torch.nn.Sequential(torch.nn.LayerNorm(args.text_hidden),
                                   torch.nn.Linear(args.text_hidden, len(SHAPES) + len(COLORS) + 2 + 1))
    return tokenizer, model, fspec, grid, packer, aux_head


def init_for_scratch(model, seed: int) -> None:
    """LLaVA-OV's initialisation assumes pretrained parts. From scratch it leaves the video
    tokens nearly identical (projector weights of std 0.02 shrink them to ~0.01 per dimension,
    and the vision tower's residual stream is swamped by its own branches), and nothing
    spatial is learned in thousands of steps. So: default (fan-in) init for the projector,
    residual branches of the vision tower scaled by 0.1 (each layer starts near identity),
    and position embeddings large enough to read (std 0.5)."""
    torch.manual_seed(seed + 2)
    core = model.model
    with torch.no_grad():
        core.multi_modal_projector.linear_1.reset_parameters()
        core.multi_modal_projector.linear_2.reset_parameters()
        vt = core.vision_tower
        for layer in vt.encoder.layers:
            layer.self_attn.out_proj.weight.mul_(0.1)
            layer.mlp.fc2.weight.mul_(0.1)
        vt.embeddings.position_embedding.weight.normal_(0, 0.5)


def aux_loss(head, feats, aux, background_weight: float = 0.1):
    """feats [N, T, n, D]: each token predicts the frame's shape, colour and object centre
    (weighted towards the tokens the object covers: a local task the vision tower learns
    fast; background tokens get ``background_weight``), and whether the object covers its
    own cell."""
    out = head(feats)
    ns, nc = len(SHAPES), len(COLORS)
    n = feats.shape[-2]
    w = background_weight + (aux["cov"] > 0.08).float()  # [..., n]
    w = w / w.sum()
    shape_t = aux["shape"][..., None].expand(*aux["shape"].shape, n).reshape(-1)
    color_t = aux["color"][..., None].expand(*aux["color"].shape, n).reshape(-1)
    shape_l = (F.cross_entropy(out[..., :ns].reshape(-1, ns), shape_t, reduction="none") * w.reshape(-1)).sum()
    color_l = (F.cross_entropy(out[..., ns:ns + nc].reshape(-1, nc), color_t, reduction="none") * w.reshape(-1)).sum()
    xy_l = (((out[..., ns + nc:ns + nc + 2] - aux["xy"][..., None, :]) ** 2).sum(-1) * w).sum()
    cov_l = F.binary_cross_entropy_with_logits(out[..., -1], aux["cov"])
    with torch.no_grad():
        obj = aux["cov"].reshape(-1) > 0.08
        acc = (out[..., :ns].reshape(-1, ns).argmax(-1) == shape_t)[obj].float().mean().item()
    return shape_l + color_l + 2 * xy_l + cov_l, (shape_l.item(), color_l.item(), xy_l.item(), cov_l.item(), acc)


def lm_loss(logits, targets, decision_ids: torch.Tensor, decision_weight: float) -> torch.Tensor:
    """Cross-entropy over the answer tokens and EOS. The caption's "moves"/"stays" token
    decides, before any direction word, whether the object moves at all; it is one token in
    a dozen per clip and was the caption's main error (the model wrote "moves still"), so
    it weighs ``decision_weight``."""
    flat_t = targets.reshape(-1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_t, ignore_index=-100, reduction="none")
    w = (flat_t != -100).float()
    w = torch.where(torch.isin(flat_t, decision_ids), w * decision_weight, w)
    return (ce * w).sum() / w.sum()


def lr_at(step: int, args) -> float:
    """Phase 1 (vision pre-training): warm-up then constant. Phase 2 (joint): warm-up again
    (the language model is fresh) then cosine to 5 %."""
    if step < args.pretrain_steps:
        return args.lr * min(1.0, (step + 1) / 30)
    s = step - args.pretrain_steps
    n = args.steps - args.pretrain_steps
    if s < args.warmup:
        return args.lr * (s + 1) / args.warmup
    p = min(1.0, (s - args.warmup) / max(1, n - args.warmup))
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def export(model, tokenizer, fspec, args, path: Path = OUT_DIR):
    prune_layer = max(1, args.text_layers // 2)
    save_checkpoint(model, tokenizer, path, fspec, {
        "num_frames": args.frames, "prune_layer": prune_layer, "ttm_k": 0.7, "prune_p": 0.7,
        "caption_prompt": "describe the video.",
    })
    print(f"wrote {path} ({(path / 'model.safetensors').stat().st_size / 1e6:.2f} MB weights)", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--branches", type=int, default=6)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--patch", type=int, default=12)
    ap.add_argument("--vision-hidden", type=int, default=64)
    ap.add_argument("--vision-layers", type=int, default=3)
    ap.add_argument("--vision-heads", type=int, default=2)
    ap.add_argument("--text-hidden", type=int, default=128)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--ttm-p", type=float, default=0.0,
                    help="fraction of joint steps whose video tokens go through DyCoke's TTM (random K)")
    ap.add_argument("--decision-weight", type=float, default=5.0, help="loss weight of the caption's moves/stays token")
    ap.add_argument("--pretrain-steps", type=int, default=800, help="vision pre-training steps (counted in --steps)")
    ap.add_argument("--pretrain-batch", type=int, default=128, help="independent frames per pre-training step")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--heldout-seed", type=int, default=777001)
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (and export the best) after this long")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt-dir", type=Path, default=CKPT_DIR)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer, model, fspec, grid, packer, aux_head = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.3f} M params; {args.frames} frames x {grid * grid} tokens/frame "
          f"+1 = {packer.V} video tokens; vocab {len(tokenizer)}", flush=True)
    params = list(model.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    last, best_path = args.ckpt_dir / "last.pt", args.ckpt_dir / "best.pt"
    step, best = 0, {"overall": -1.0, "min_kind": -1.0, "step": -1}
    history = []
    if last.exists() and not args.fresh:
        st = torch.load(last, weights_only=False)
        model.load_state_dict(st["model"])
        aux_head.load_state_dict(st["aux"])
        opt.load_state_dict(st["opt"])
        step, best, history = st["step"], st["best"], st.get("history", [])
        print(f"resumed from {last} at step {step} (best so far {best})", flush=True)
    else:
        with torch.no_grad():
            pix, _, _, _ = make_batch(0, argparse.Namespace(**{**vars(args), "batch": 1}), packer, fspec, grid)
            diff = check_packing(model.eval(), packer, tokenizer, pix, "which way does the cup move ?", "left")
        print(f"packed forward vs model(): max |diff| = {diff:.2e}", flush=True)
        assert diff < 1e-4, diff
    model.train()
    decision_ids = torch.tensor(tokenizer.convert_tokens_to_ids(["moves", "stays"]))

    t_h = time.time()
    heldout = make_heldout(args.heldout, args.heldout_seed, args, packer, fspec, args.ckpt_dir / "heldout_clips")
    print(f"held-out set: {args.heldout} h264 clips ({time.time() - t_h:.1f} s)", flush=True)

    def save(path, extra=None):
        torch.save({"model": model.state_dict(), "aux": aux_head.state_dict(), "opt": opt.state_dict(),
                    "step": step, "best": best, "history": history, "args": vars(args), **(extra or {})}, path)

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    t0 = time.time()
    ema = None
    try:
        while step < args.steps and not stop["now"]:
            ts = time.time()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args)
            if step < args.pretrain_steps:  # phase 1: vision tower + projector + probe only
                pix, aux = make_frame_batch(step, args, fspec, grid)
                td = time.time() - ts
                feats = model.model.get_video_features(
                    pix[:, None], vision_feature_layer=model.config.vision_feature_layer,
                    vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output[:, :-1]
                al, parts = aux_loss(aux_head, feats, aux)
                lm = torch.zeros(())
                loss = al
            else:
                pix, aux, ids, labels = make_batch(step, args, packer, fspec, grid)
                td = time.time() - ts
                ttm_k = None
                r = np.random.default_rng([args.seed, 7, step]).random()
                if r < args.ttm_p:  # train on what DyCoke's TTM leaves, too
                    ttm_k = float(np.random.default_rng([args.seed, 8, step]).choice([0.5, 0.6, 0.7, 0.7, 0.8]))
                logits, feats = packed_logits(model, packer, pix, ids, return_features=True, ttm_k=ttm_k)
                targets = branch_targets(labels)
                lm = lm_loss(logits, targets, decision_ids, args.decision_weight)
                al, parts = aux_loss(aux_head, feats, aux)
                loss = lm + args.aux_weight * al
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step > args.pretrain_steps:
                ema = lm.item() if ema is None else 0.95 * ema + 0.05 * lm.item()
            if step % 10 == 0 or step == 1:
                phase = "vision" if step <= args.pretrain_steps else "joint"
                print(f"step {step:5d} [{phase}] lm {lm.item():.4f} (ema {(ema or 0):.4f}) aux shape {parts[0]:.3f} "
                      f"(acc {parts[4]:.2f}) colour {parts[1]:.3f} xy {parts[2]:.4f} cov {parts[3]:.3f} lr {lr_at(step - 1, args):.2e} "
                      f"{time.time() - ts:.2f}s/step (data {td:.2f}s) elapsed {(time.time() - t0) / 60:.1f} min", flush=True)
            if step > args.pretrain_steps and ((step - args.pretrain_steps) % args.eval_every == 0 or step == args.steps):
                res = evaluate(model, packer, heldout)
                res["step"] = step
                history.append(res)
                print("EVAL step %d: " % step + " ".join(f"{k} {v:.3f}" for k, v in res.items() if k != "step"), flush=True)
                if args.ttm_p:
                    rt = evaluate(model, packer, heldout, ttm_k=0.7)
                    print("  with TTM K=0.7: " + " ".join(f"{k} {v:.3f}" for k, v in rt.items()), flush=True)
                if (res["min_kind"], res["overall"]) >= (best["min_kind"], best["overall"]):
                    best = res
                    save(best_path)
                    print(f"  new best at step {step}", flush=True)
            if step % args.ckpt_every == 0:
                save(last)
            if args.max_minutes and (time.time() - t0) / 60 > args.max_minutes:
                print(f"time budget of {args.max_minutes} min reached at step {step}", flush=True)
                break
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    save(last)
    if step > args.pretrain_steps and (step - args.pretrain_steps) % args.eval_every:  # the final weights too
        res = evaluate(model, packer, heldout)
        res["step"] = step
        history.append(res)
        print("EVAL step %d: " % step + " ".join(f"{k} {v:.3f}" for k, v in res.items() if k != "step"), flush=True)
        if (res["min_kind"], res["overall"]) >= (best["min_kind"], best["overall"]):
            best = res
            save(best_path)
    (args.ckpt_dir / "history.json").write_text(json.dumps(history, indent=1))
    print(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; best {best}", flush=True)
    if not args.no_export:
        src = best_path if best_path.exists() else last
        model.load_state_dict(torch.load(src, weights_only=False)["model"])
        model.eval()
        export(model, tokenizer, fspec, args, args.out)


if __name__ == "__main__":
    main()
