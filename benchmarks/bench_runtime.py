"""Monitoring cost inside a real model: plain forward vs emovec.monitor vs naive PyTorch forward hooks.

    python benchmarks/bench_runtime.py                    # default model, CPU, fp32
    python benchmarks/bench_runtime.py --device cuda --dtype bfloat16

Three providers per scenario (prefill batch x tokens, and decode steps with a KV cache): "plain" (no
monitoring), "hooks" (a forward hook per layer doing matmul + norm + copy into a buffer, the naive approach)
and "emovec" (the fused op). Vectors are random unit vectors (K of them) at every layer; what is timed is
the same work. Results go to benchmarks/results/runtime_<device>.csv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import emovec  # noqa: E402
from emovec.layers import find_decoder_layers, layer_output_hidden  # noqa: E402
from harness import measure, print_table, write_csv  # noqa: E402


class NaiveHooks:
    """What users write today: per layer, project the output onto the vectors with separate torch ops."""

    def __init__(self, model, unit: torch.Tensor):
        self.found = find_decoder_layers(model)
        self.unit = unit
        self.records: list = []
        self.handles = []

    def __enter__(self):
        for i, layer in enumerate(self.found.layers):
            self.handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, i):
        def hook(module, args, output):
            h = layer_output_hidden(output).float()
            self.records.append(((h @ self.unit[i].T), h.norm(dim=-1)))

        return hook

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--k", type=int, default=171)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    model, tokenizer, name = emovec.load_model(args.model, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    found = find_decoder_layers(model)
    L, d = len(found.layers), found.hidden_size
    g = torch.Generator().manual_seed(0)
    vectors = emovec.VectorSet.from_tensor(torch.randn(L, args.k, d, generator=g), [f"v{i}" for i in range(args.k)],
                                           layers=list(range(L)))
    unit = vectors.unit.to(device)
    ids = torch.randint(100, 10000, (args.batch, args.tokens), generator=g).to(device)
    rows = []

    @torch.no_grad()
    def prefill(provider):
        if provider == "plain":
            model(input_ids=ids)
        elif provider == "hooks":
            with NaiveHooks(model, unit):
                model(input_ids=ids)
        else:
            with emovec.monitor(model, vectors, layers="all"):
                model(input_ids=ids)

    @torch.no_grad()
    def decode(provider):
        kwargs = dict(max_new_tokens=args.decode_steps, min_new_tokens=args.decode_steps, do_sample=False,
                      pad_token_id=tokenizer.pad_token_id)
        one = ids[:1, :32]
        if provider == "plain":
            model.generate(one, **kwargs)
        elif provider == "hooks":
            with NaiveHooks(model, unit):
                model.generate(one, **kwargs)
        else:
            with emovec.monitor(model, vectors, layers="all"):
                model.generate(one, **kwargs)

    for scenario, fn, tokens in (("prefill", prefill, args.batch * args.tokens), ("decode", decode, args.decode_steps)):
        times = {p: measure(lambda p=p: fn(p), device, warmup=1, repeats=args.repeats) for p in ("plain", "hooks", "emovec")}
        row = {"model": name, "device": device.type, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
               "scenario": scenario, "K": args.k, "layers": L, "tokens": tokens}
        for p, t in times.items():
            row[f"{p}_p50_ms"] = t["p50_ms"]
        row["hooks_overhead"] = times["hooks"]["p50_ms"] / times["plain"]["p50_ms"] - 1
        row["emovec_overhead"] = times["emovec"]["p50_ms"] / times["plain"]["p50_ms"] - 1
        rows.append(row)
        print_table([row], list(row))
    out = args.out or f"benchmarks/results/runtime_{device.type}.csv"
    write_csv(out, rows)
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
