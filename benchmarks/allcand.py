"""All-candidate VQA scoring: OFA's way (encoder shared, decoder re-run over prompt + answer for every candidate,
OFA's chunks of 20 rows) vs the prefix-tree scorer (prompt once with a KV cache, each answer prefix once), side by
side on the same model, batch and candidates.

CPU (default): ofa_tiny, 4 questions, 256×256 images, ~20-token prev_output prompts, 3,129 candidates, 2 threads.
    python benchmarks/allcand.py
    python benchmarks/allcand.py --arch ofa_tiny,ofa_base --naive-candidates 100
GPU: python benchmarks/allcand.py --device cuda --arch ofa_tiny,ofa_base --batch 20 --image-size 480

Candidates: 3,129 distinct synthetic VQA-style answers (yes/no, numbers, colours, objects, "red and white",
"tennis racket", …) encoded as OFA does, BPE(" " + answer), with the GPT-2 BPE files (--bpe, default
../shared/ofa-bpe); the table's header prints their token-length histogram. Random weights (the speed does not
depend on them), eval mode.

Timing: candidates/s = questions × candidates / seconds for one batch. The tree scorer scores all candidates;
OFA's way is timed on an evenly strided subset (--naive-candidates, same length distribution) because its full run
takes minutes per batch on a CPU; its cost is linear in the number of candidates. Both run interleaved after a
warm-up; medians. The scores of the subset are compared (max |difference|) as a check that both compute the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.generate import BOS, score_candidates, score_candidates_naive

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_BPE = Path(__file__).resolve().parents[2] / "shared" / "ofa-bpe"

COLORS = ("red white blue black green yellow orange brown gray pink purple silver gold tan beige maroon navy "
          "teal clear dark").split()
NOUNS = ("dog cat man woman person people child boy girl baby horse cow sheep bird elephant giraffe zebra bear "
         "car bus truck train plane boat bike motorcycle skateboard surfboard skis snowboard kite frisbee ball "
         "bat glove racket tennis baseball soccer pizza cake donut sandwich banana apple orange broccoli carrot "
         "hot dog food table chair couch bed toilet sink tv laptop phone keyboard mouse remote clock vase book "
         "umbrella bag suitcase tie hat shirt jacket helmet glasses shoes grass water snow sand sky tree trees "
         "building street road sidewalk fence wall window door kitchen bathroom bedroom living room beach park "
         "field ocean river mountain city night day sun cloud clouds rain wood metal plastic glass stone brick "
         "paper cardboard leather cotton coffee tea wine beer milk juice plate bowl cup fork knife spoon").split()
ADJECTIVES = ("big small large little tall short old new young happy sad wet dry hot cold empty full open closed "
              "round square wooden striped plaid floral leafy sunny cloudy snowy rainy busy").split()
VERBS = ("eating sitting standing walking running playing sleeping flying riding skiing surfing skateboarding "
         "talking reading watching cooking swimming jumping").split()


def synthetic_answers(n: int) -> list[str]:
    """n distinct VQA-style answers, most frequent kinds first (single words, then two- and three-word phrases)."""
    pools = [["yes", "no"], [str(i) for i in range(101)], COLORS, NOUNS, VERBS, ADJECTIVES,
             [w + "s" for w in NOUNS if not w.endswith("s")],
             [f"{a} and {b}" for a in COLORS for b in COLORS if a < b],
             [f"{c} {w}" for w in NOUNS for c in COLORS],
             [f"{a} {w}" for w in NOUNS for a in ADJECTIVES],
             [f"{v} {w}" for w in NOUNS for v in VERBS]]
    out: dict[str, None] = {}
    # interleave the phrase pools so the list mixes lengths like a real answer list's tail does
    for pool in pools[:7]:
        out.update(dict.fromkeys(pool))
    rest = pools[7:]
    i = 0
    while len(out) < n:
        pool = rest[i % len(rest)]
        out.setdefault(pool[(i // len(rest)) % len(pool)], None)
        i += 1
    return list(out)[:n]


def make_batch(args, device, dtype, generator):
    b = args.batch
    src = torch.randint(4, 50000, (b, args.prompt_len + 1), generator=generator)
    src[:, 0] = BOS
    prompts = []
    for i in range(b):  # prev_output prompts (source minus eos) of varying length around --prompt-len
        n = args.prompt_len + (i % 5) - 2
        prompts.append([BOS] + torch.randint(4, 50000, (n - 1,), generator=generator).tolist())
    batch = dict(src_tokens=src.to(device), patch_masks=torch.ones(b, dtype=torch.bool, device=device),
                 patch_images=torch.randn(b, 3, args.image_size, args.image_size, generator=generator).to(device,
                                                                                                          dtype))
    return batch, prompts


def timed(fn, device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="ofa_tiny", help="comma-separated presets")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default fp32 on CPU, bf16 on GPU")
    p.add_argument("--batch", type=int, default=4, help="questions per batch")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=20, help="decoder prompt tokens (bos + question)")
    p.add_argument("--candidates", type=int, default=3129)
    p.add_argument("--naive-candidates", type=int, default=200,
                   help="candidates OFA's way is timed on (an evenly strided subset); 0 = all")
    p.add_argument("--chunk-size", type=int, default=20, help="OFA's valid_batch_size: rows per naive pass")
    p.add_argument("--rows-per-pass", type=int, default=4096, help="query rows per tree pass")
    p.add_argument("--bpe", default=str(DEFAULT_BPE), help="directory of the GPT-2 BPE files (encoder.json …)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from ofa_scale.data.tokenizer import load_tokenizer

    if not (Path(args.bpe) / "encoder.json").is_file():
        p.error(f"--bpe {args.bpe} holds no encoder.json; point it at OFA's GPT-2 BPE files")
    tok = load_tokenizer("gpt2-bpe", args.bpe)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    cands = [tok.encode(" " + a) for a in synthetic_answers(args.candidates)]
    lengths = Counter(len(c) for c in cands)
    stride = max(1, len(cands) // args.naive_candidates) if args.naive_candidates else 1
    subset = list(range(0, len(cands), stride))[:args.naive_candidates or None]
    sub_cands = [cands[i] for i in subset]
    print(f"device={device} dtype={dtype} questions={args.batch} image={args.image_size} prompt~{args.prompt_len} "
          f"candidates={len(cands)} (tokens: " + ", ".join(f"{k}: {lengths[k]}" for k in sorted(lengths)) +
          f"; naive timed on {len(sub_cands)}) chunk={args.chunk_size} rows/pass={args.rows_per_pass} "
          f"threads={args.threads} warmup={args.warmup} repeats={args.repeats}")

    rows = []
    for arch in args.arch.split(","):
        torch.manual_seed(0)
        model = OFAModel(OFAConfig.preset(arch, vocab_size=len(tok))).to(device=device, dtype=dtype).eval()
        batch, prompts = make_batch(args, device, dtype, torch.Generator().manual_seed(0))
        # the constraint trie is over all candidates in both ways (the subset's log-softmax renormalises over the
        # same continuations as in the full run)
        from ofa_scale.utils.trie import Trie
        trie = Trie.from_answers(cands, bos=BOS, eos=2)
        runs = {
            "naive": lambda: score_candidates_naive(model, batch, sub_cands, decoder_prompts=prompts,
                                                    constraint_trie=trie, chunk_size=args.chunk_size),
            "tree": lambda: score_candidates(model, batch, cands, decoder_prompts=prompts, constraint_trie=trie,
                                             rows_per_pass=args.rows_per_pass),
        }
        counted = {"naive": len(sub_cands), "tree": len(cands)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        outs = {}
        for name, fn in runs.items():
            for _ in range(args.warmup):
                _, outs[name] = timed(fn, device)
        for _ in range(args.repeats):
            for name, fn in runs.items():
                seconds, outs[name] = timed(fn, device)
                times[name].append(seconds)
        diff = (outs["tree"][:, subset] - outs["naive"]).abs().max().item()
        same_argmax = bool((outs["tree"][:, subset].argmax(1) == outs["naive"].argmax(1)).all())
        base = args.batch * counted["naive"] / statistics.median(times["naive"])
        for name in runs:
            med = statistics.median(times[name])
            rate = args.batch * counted[name] / med
            rows.append((arch, name, str(dtype).replace("torch.", ""), counted[name], med, min(times[name]), rate,
                         rate / base, diff, same_argmax))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    header = f"{'arch':<10} {'method':<7} {'dtype':<9} {'cands':>6} {'median s':>9} {'min s':>8} {'cands/s':>10} " \
             f"{'ratio':>7} {'max |Δ|':>9} {'argmax':>7}"
    print(header)
    print("-" * len(header))
    for arch, name, dt, n, med, fastest, rate, ratio, diff, same in rows:
        print(f"{arch:<10} {name:<7} {dt:<9} {n:>6} {med:9.3f} {fastest:8.3f} {rate:10.1f} {ratio:7.1f} "
              f"{diff:9.2e} {'same' if same else 'DIFF':>7}")
    print("(cands/s = questions × candidates scored / median seconds per batch; ratio = cands/s / OFA's way's for "
          "the same arch; max |Δ| and argmax compare the two ways' scores on the naive subset)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
