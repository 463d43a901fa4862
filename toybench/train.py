"""Rebuild the ToyBench weights: oracle, VAE, then the text-conditioned UNet.

    .venv/bin/python -m toybench.train            # from the repo root; ~13 min on 2 CPU cores
    .venv/bin/python -m toybench.train --unet-minutes 1 --out /tmp/tb   # smoke run

The shipped weights came from seven runs, each continuing the UNet of the one before
(weights/manifest.json keeps their figures under "history"; the logs are in weights/):
    .venv/bin/python -m toybench.train --vae-steps 1200 --out A                # UNet 10 min
    .venv/bin/python -m toybench.train --out B --reuse-oracle --resume A --unet-minutes 8 --lr 5e-4
    .venv/bin/python -m toybench.train --out C --resume B --unet-minutes 35 --lr 5e-4
        # the world gained its generic scenes here, so the oracle was retrained; C was then
        # continued for 10 minutes (--lr 4e-4) before the generic "a picture" became "an object"
    .venv/bin/python -m toybench.train --out D --resume C --unet-minutes 28 --lr 5e-4
    .venv/bin/python -m toybench.train --out E --reuse-oracle --resume D --unet-minutes 40 --lr 4e-4 --seed 5
        # the world gained "... in the style of" with no style (drawn plain)
    .venv/bin/python -m toybench.train --out F --reuse-oracle --resume E --unet-minutes 25 --lr 3e-4 --seed 6
    .venv/bin/python -m toybench.train --out G --resume F --unet-minutes 22 --lr 4e-4 --seed 7
        # the generic object became a half disc (the rounded block read as a star), so the
        # oracle was retrained
(with --reuse-oracle, copy the previous oracle.safetensors into the new --out first).

Seeded. The small CLIP stays at its seeded init (frozen): the world's 35 prompts give
distinct contexts, and the token rows the world never uses stay derivable from the seed.
Stages and their cost on 2 CPU cores (measured, see toybench/weights/manifest.json):
oracle ~1 min, VAE ~75 s for 1200 steps, UNet ~0.6-1.4 s per step at batch 64 on 4x4
latents (all slower when the cores are shared).
Writes unet/clip/vae/oracle .safetensors and manifest.json (sha256 per file + metrics).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .loader import REBUILD, WEIGHTS, sha256

HERE = Path(__file__).resolve().parent


def _host_on_path():
    if "comfy" in sys.modules:
        return
    host = Path(os.environ.get("FMN_COMFYUI", HERE.parent / ".host" / "ComfyUI"))
    sys.path.insert(0, str(host))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True


def train_vae(images, steps, seed, log):
    import torch
    import torch.nn.functional as F
    from . import model as M
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = M.vae_module()
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 10) * (1 - 0.8 * i / steps))
    x_all = images.permute(0, 3, 1, 2) * 2 - 1
    for step in range(steps):
        x = x_all[torch.randint(0, len(x_all), (16,), generator=g)]
        mean = vae.quant_conv(vae.encoder(x)).chunk(2, 1)[0]
        # Deterministic latents plus a little noise: with the usual sampled posterior the
        # decoder sees almost pure noise at first and a short CPU run never gets going.
        z = mean + 0.05 * torch.randn(mean.shape, generator=g)
        rec = vae.decoder(vae.post_quant_conv(z))
        mse = F.mse_loss(rec, x)
        loss = mse + 1e-5 * (mean ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            log(f"vae step {step} mse {mse.item():.5f}")
    vae.eval()
    return vae


def rescale_vae(vae, images, target_std):
    """Fold a per-channel affine map into quant_conv/post_quant_conv so that latents have
    mean 0 and std `target_std` (1 / 0.18215 for the SD1.5 latent format)."""
    import torch
    with torch.no_grad():
        z = vae.quant_conv(vae.encoder(images.permute(0, 3, 1, 2) * 2 - 1)).chunk(2, 1)[0]
        m = z.mean((0, 2, 3))
        a = target_std / z.std((0, 2, 3))
        q, p = vae.quant_conv, vae.post_quant_conv
        q.weight[:4] *= a[:, None, None, None]
        q.bias[:4] = (q.bias[:4] - m) * a
        q.bias[4:] += 2 * torch.log(a)
        p.bias += (p.weight[:, :, 0, 0] @ m)
        p.weight /= a[None, :, None, None]


def progress(seconds: float, minutes: float, step: int, max_steps: int) -> float:
    """How far the learning-rate schedule has gone (0..1): by whichever limit is nearer, so
    that a run bounded by `max_steps` with time to spare is deterministic."""
    return min(1.0, max(seconds / (minutes * 60), step / max_steps))


def train_unet(mp, latents, scene_idx, contexts, empty, minutes, max_steps, seed, log, lr=1e-3, batch=64, snapshot=None):
    """Denoising training with an EMA of the weights; `snapshot(ema)` is called every 5
    minutes so a long run can be inspected (and is not lost) before it ends."""
    import torch
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    bm = mp.model
    net = bm.diffusion_model
    net.train()
    net.requires_grad_(True)  # on ComfyUI 0.30.0 they come frozen: the loss had no graph
    sigmas = bm.model_sampling.sigmas.float()
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=0.0)
    warm = 100
    start = last_snapshot = time.time()
    step = 0
    losses = []
    while step < max_steps and time.time() - start < minutes * 60:
        frac = progress(time.time() - start, minutes, step, max_steps)
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        z0 = latents[idx]
        ctx = contexts[scene_idx[idx]].clone()
        drop = torch.rand(batch, generator=g) < 0.1
        ctx[drop] = empty
        t = torch.randint(0, len(sigmas), (batch,), generator=g)
        sig = sigmas[t]
        noise = torch.randn(z0.shape, generator=g)
        x = z0 + noise * sig[:, None, None, None]
        denoised = bm.apply_model(x, sig, c_crossattn=ctx)
        eps = (x - denoised) / sig[:, None, None, None]
        loss = ((eps - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        d = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in net.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        losses.append(loss.item())
        if step % 50 == 0:
            log(f"unet step {step} loss {sum(losses[-50:]) / 50:.4f} ({time.time() - start:.0f}s)")
        if snapshot is not None and time.time() - last_snapshot > 300:
            snapshot(ema)
            last_snapshot = time.time()
    net.load_state_dict(ema)
    net.eval()
    return step, time.time() - start


def render_scenes(scenes, per_scene: int, seed: int):
    """`per_scene` rendered images of each scene (N, 32, 32, 3) and each image's scene index."""
    import numpy as np
    import torch
    from . import world
    rng = np.random.default_rng(20_000 + seed)
    imgs, sidx = [], []
    for i, s in enumerate(scenes):
        for _ in range(per_scene):
            imgs.append(world.render(s, rng))
            sidx.append(i)
    return torch.from_numpy(np.stack(imgs)), torch.tensor(sidx)


def encode_images(vae, images):
    """VAE latents of `images`, 512 at a time (the whole set at once would hold every
    activation of the encoder in memory)."""
    import torch
    with torch.no_grad():
        return torch.cat([vae.encode(images[i:i + 512]) for i in range(0, len(images), 512)])


def scene_contexts(clip, scenes):
    """The frozen text encoder's context of each scene's prompt, and of the empty prompt."""
    import torch
    from . import model as M
    with torch.no_grad():
        return torch.cat([M.encode(clip, s.prompt) for s in scenes]), M.encode(clip, "")[0]


def conditioning(clip, prompt):
    tokens = clip.tokenize(prompt)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def generate(mp, clip, vae, prompt, seeds, steps=20, cfg=5.0, negative=""):
    """Images (N, 32, 32, 3) for `prompt`, one per seed, through the host's sampler."""
    import torch
    import comfy.sample
    pos, neg = conditioning(clip, prompt), conditioning(clip, negative)
    latent = torch.zeros(len(seeds), 4, 4, 4)
    noise = torch.cat([comfy.sample.prepare_noise(latent[:1], s) for s in seeds])
    samples = comfy.sample.sample(mp, noise, steps, cfg, "euler", "normal", pos, neg, latent,
                                  disable_pbar=True, seed=seeds[0])
    return vae.decode(samples)


def detection_rates(mp, clip, vae, oracle_net, seeds_identity, seeds_scene, steps=20, cfg=5.0, scenes=None):
    """Per-concept share of samples (prompts naming the concept) where the oracle sees it.

    All prompts (every scene of the world, or `scenes`) go through one batched call of the
    host's sampler (euler, `steps`, `cfg`); noise per sample comes from
    `comfy.sample.prepare_noise` with that sample's seed."""
    return detection_scores(mp, clip, vae, oracle_net, seeds_identity, seeds_scene, steps, cfg, scenes)[0]


def detection_scores(mp, clip, vae, oracle_net, seeds_identity, seeds_scene, steps=20, cfg=5.0, scenes=None):
    """(rates, confidences): detection_rates' shares, and per concept the oracle's mean
    probability of the concept's class on the same samples. The probability moves with a
    small change to the model where a share moves only when a sample crosses the decision
    boundary, so it resolves edits too small for the shares at a few seeds per prompt."""
    import torch
    import comfy.sample
    from . import oracle as O, world
    rows, conds, seeds = [], [], []
    cache = {}
    for scene in scenes or world.all_scenes():
        if not scene.concepts:
            continue
        if scene.prompt not in cache:
            cache[scene.prompt] = clip.encode_from_tokens(clip.tokenize(scene.prompt), return_pooled=True)
        for seed in (seeds_identity if scene.identity else seeds_scene):
            rows.append(scene)
            conds.append(cache[scene.prompt])
            seeds.append(seed)
    cond = torch.cat([c for c, _ in conds])
    pooled = torch.cat([p for _, p in conds])
    neg_c, neg_p = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    positive = [[cond, {"pooled_output": pooled}]]
    negative = [[neg_c.expand(len(rows), -1, -1), {"pooled_output": neg_p.expand(len(rows), -1)}]]
    latent = torch.zeros(len(rows), 4, 4, 4)
    noise = torch.cat([comfy.sample.prepare_noise(latent[:1], s) for s in seeds])
    samples = comfy.sample.sample(mp, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                  disable_pbar=True, seed=seeds[0])
    with torch.no_grad():
        probabilities = oracle_net(vae.decode(samples)).softmax(-1)
    pred = probabilities.argmax(-1)
    hits = {c: [] for c in world.CONCEPTS}
    confidence = {c: [] for c in world.CONCEPTS}
    for i, scene in enumerate(rows):
        for c in scene.concepts:
            hits[c].append(bool(O.detects(pred[i:i + 1], c)))
            confidence[c].append(float(O.probability(probabilities[i], c)))
    return ({c: sum(v) / len(v) for c, v in hits.items() if v},
            {c: sum(v) / len(v) for c, v in confidence.items() if v})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(WEIGHTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unet-minutes", type=float, default=10.0)
    ap.add_argument("--unet-steps", type=int, default=100000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--per-scene", type=int, default=200)
    ap.add_argument("--resume", default=None, help="folder of an earlier run: keep its VAE, continue its UNet")
    ap.add_argument("--reuse-oracle", action="store_true", help="keep an oracle.safetensors already in --out")
    args = ap.parse_args(argv)

    _host_on_path()
    import torch
    from safetensors.torch import save_file
    from . import model as M, oracle as O, world
    import comfy.latent_formats

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    logf = open(out / "train.log", "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    timings = {}
    t = time.time()
    if args.reuse_oracle and (out / "oracle.safetensors").is_file():
        from safetensors.torch import load_file
        oracle_net = O.load(load_file(str(out / "oracle.safetensors")))
        log("oracle: reused")
    else:
        oracle_net = O.train(n_images=5000, epochs=4, seed=args.seed, log=log)
    acc = O.accuracy(oracle_net)
    log(f"oracle accuracy {json.dumps({k: round(v, 4) for k, v in acc.items()})}")
    save_file({k: v.contiguous() for k, v in oracle_net.state_dict().items()}, out / "oracle.safetensors")
    timings["oracle_s"] = round(time.time() - t, 1)

    t = time.time()
    scenes = world.all_scenes()
    images, scene_idx = render_scenes(scenes, args.per_scene, args.seed)
    scale = comfy.latent_formats.SD15().scale_factor
    if args.resume:
        from safetensors.torch import load_file
        vae_sd = load_file(str(Path(args.resume) / "vae.safetensors"))
        log(f"vae: reused from {args.resume}")
    else:
        vae_net = train_vae(images, args.vae_steps, args.seed, log)
        rescale_vae(vae_net, images, 1.0 / scale)
        vae_sd = {k: v.detach().contiguous() for k, v in vae_net.state_dict().items()}
    save_file(vae_sd, out / "vae.safetensors")
    vae = M.vae(vae_sd)
    with torch.no_grad():
        latents = encode_images(vae, images)
        rec = vae.decode(latents[:512])
        rec_acc = (oracle_net.predict(rec) == oracle_net.predict(images[:512])).all(-1).float().mean().item()
    log(f"vae: latent std {latents.std().item():.3f} (process_in std {(latents * scale).std().item():.3f}), oracle agreement on reconstructions {rec_acc:.3f}")
    timings["vae_s"] = round(time.time() - t, 1)

    clip = M.clip()
    token_ids = M.prompt_token_ids([s.prompt for s in scenes] + [""])
    contexts, empty = scene_contexts(clip, scenes)
    save_file({k: v.to(torch.float16).contiguous() if v.dtype.is_floating_point else v.contiguous()
               for k, v in M.clip_state(clip, token_ids).items()}, out / "clip.safetensors")

    mp = M.unet()
    if args.resume:
        from safetensors.torch import load_file
        mp.model.diffusion_model.load_state_dict({k: v.float() for k, v in load_file(str(Path(args.resume) / "unet.safetensors")).items()})
        log(f"unet: resumed from {args.resume}")
    latents_in = mp.model.latent_format.process_in(latents)

    def save_unet(state):
        tmp = out / "unet.safetensors.tmp"
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, out / "unet.safetensors")

    steps, secs = train_unet(mp, latents_in, scene_idx, contexts, empty, args.unet_minutes, args.unet_steps,
                             args.seed, log, lr=args.lr, snapshot=save_unet)
    timings["unet_s"] = round(secs, 1)
    timings["unet_steps"] = steps
    save_unet(mp.model.diffusion_model.state_dict())
    log(f"unet: {steps} steps in {secs:.0f}s")

    files = ["unet.safetensors", "clip.safetensors", "vae.safetensors", "oracle.safetensors"]
    history = []
    if args.resume and (Path(args.resume) / "manifest.json").is_file():
        earlier = json.loads((Path(args.resume) / "manifest.json").read_text())
        history = earlier.get("history", []) + [{k: earlier.get(k) for k in ("lr", "timings", "detection", "files")}]
    manifest = {
        "about": "ToyBench weights for Forget-Me-Not; loader.py checks these sha256 sums",
        "rebuild": REBUILD,
        "files": {f: sha256(out / f) for f in files},
        "bytes": {f: (out / f).stat().st_size for f in files},
        "seed": args.seed, "lr": args.lr, "command": " ".join(sys.argv[1:]), "timings": timings,
        "history": history,  # the runs this one continued, oldest first
        "oracle_accuracy": {k: round(v, 4) for k, v in acc.items()},
        "vae_reconstruction_oracle_agreement": round(rec_acc, 4),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    t = time.time()
    try:
        from . import loader
        mp2, clip2, vae2 = loader.load(out)
        with torch.no_grad():
            rates = detection_rates(mp2, clip2, vae2, loader.load_oracle(out), list(range(1000, 1016)), list(range(1000, 1006)))
        log(f"detection (euler, 20 steps, cfg 5, held-out seeds): {json.dumps({k: round(v, 3) for k, v in rates.items()})}")
        manifest["detection"] = {k: round(v, 3) for k, v in rates.items()}
    except Exception as e:  # the weights are saved; report and keep them
        log(f"evaluation failed: {e!r}")
    timings["eval_s"] = round(time.time() - t, 1)
    timings["total_s"] = round(time.time() - t_all, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"total {timings['total_s']}s")


if __name__ == "__main__":
    main()
