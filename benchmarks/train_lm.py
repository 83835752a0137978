"""Train the byte-level OPT language model on the Python standard library's sources, reproducibly.

    python benchmarks/train_lm.py --out benchmarks/checkpoints [--steps 1500] [--seed 0]

The model is :func:`exprune_fx.zoo.opt_lm` (ReLU FFN, vocab 256 = bytes). Seeded
(initialisation and data order: a seeded permutation of the train split's windows, epoch
after epoch), AdamW with a linear warmup and a cosine decay, gradient clipping at 1.0. At the
end, next-token accuracy (argmax of the logits == the next byte, over every position) is
measured on the val and the test split; the splits are made by file, so they share no file.
Writes ``opt_lm.pt`` (a float32 state dict) and ``opt_lm.json`` (accuracy, seconds, settings,
versions, the corpus root and each split's files, bytes and windows).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from exprune_fx.datasets import PYTHON_CORPUS_ROOT, load_python_corpus, python_corpus_files
from exprune_fx.zoo import opt_lm

MAX_CHECKPOINT_BYTES = 5 * 1024 * 1024


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup to ``lr``, then a cosine decay to ``lr / 10``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def next_token_accuracy(model, windows: torch.Tensor, batch: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy in nats) of next-byte prediction over all positions."""
    correct, loss, count = 0, 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in tqdm(range(0, len(windows), batch), desc="eval", leave=False, mininterval=10):
            w = windows[i:i + batch]
            logits = model(input_ids=w[:, :-1], use_cache=False).logits
            target = w[:, 1:]
            correct += (logits.argmax(-1) == target).sum().item()
            loss += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
            count += target.numel()
    return correct / count, loss / count


def split_info(split: str, root: Path, windows: torch.Tensor) -> dict:
    files = python_corpus_files(split, root)
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files), "windows": len(windows)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoints")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    parser.add_argument("--root", type=Path, default=PYTHON_CORPUS_ROOT,
                        help="folder of .py files (default: the standard library or EXPRUNE_PYTHON_CORPUS)")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)

    torch.manual_seed(args.seed)
    model = opt_lm(seed=args.seed)
    if args.context > model.config.max_position_embeddings:
        parser.error(f"--context must be at most {model.config.max_position_embeddings}")
    data = {split: load_python_corpus(split, args.context, root=args.root) for split in ("train", "val", "test")}
    train = data["train"]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(len(train), generator=g), 0

    start = time.time()
    model.train()
    bar = tqdm(range(args.steps), desc="train", mininterval=10)
    running = None
    for step in bar:
        if pos + args.batch > len(order):  # next epoch: a fresh seeded permutation
            order, pos = torch.randperm(len(train), generator=g), 0
        w = train[order[pos:pos + args.batch]]
        pos += args.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        logits = model(input_ids=w[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 20 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{group['lr']:.2e}")
    train_seconds = time.time() - start
    model.eval()

    val_acc, val_loss = next_token_accuracy(model, data["val"])
    test_acc, test_loss = next_token_accuracy(model, data["test"])
    info = {
        "model": "opt_lm", "steps": args.steps, "seed": args.seed, "batch": args.batch,
        "context": args.context, "lr": args.lr, "warmup": warmup,
        "seconds": round(train_seconds, 1), "eval_seconds": round(time.time() - start - train_seconds, 1),
        "final_train_loss": round(running, 4),
        "val_next_token_accuracy": round(val_acc, 4), "test_next_token_accuracy": round(test_acc, 4),
        "val_loss": round(val_loss, 4), "test_loss": round(test_loss, 4),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "corpus_root": str(args.root),
        "corpus": {split: split_info(split, args.root, w) for split, w in data.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = args.out / "opt_lm.pt"
    torch.save(state, path)
    info["checkpoint_bytes"] = path.stat().st_size
    if info["checkpoint_bytes"] > MAX_CHECKPOINT_BYTES:
        raise SystemExit(f"{path} is {info['checkpoint_bytes']} bytes, over the {MAX_CHECKPOINT_BYTES} limit")
    (args.out / "opt_lm.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
