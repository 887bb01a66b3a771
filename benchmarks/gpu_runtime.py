"""The runtime on a real decoder, on a GPU: correctness against float64 and naive hooks, then timings of compiled
(CUDA-graph) generation and of prefill, each with and without monitoring all layers x K vectors and steering.

    python benchmarks/gpu_runtime.py --model FOLDER                     # a saved model folder
    python benchmarks/gpu_runtime.py --random-from CONFIG_FOLDER        # random weights, the config's shapes

``--random-from`` builds a model with random weights from a folder holding only ``config.json`` and the tokenizer
files (what a GPU machine without the weights can be given): timings depend on shapes, not on weights, and the
correctness checks compare emovec with references on the same model. Sections, each written to the JSON as soon as
it is done (so a run cut short keeps what it measured):

1. ``monitor``: every layer's scores and norms from ``emovec.monitor`` (each backend) against float64 projections
   of the same forward pass's layer outputs;
2. ``steer``: logits of a forward pass under ``emovec.steer`` (each backend) against the same steering add done by a
   plain forward hook in torch;
3. ``prefill``: forward passes of B x T tokens, plain vs recording every layer x K (``emovec.monitor``) vs naive
   hooks, interleaved rounds;
4. ``compiled``: per batch size, ``emovec.generate`` compiled (``mode="reduce-overhead"`` on a GPU: inductor
   captures each phase in a CUDA graph) against its eager loop (tokens, scores, and whether a second call with
   other prompts and another recipe compiles again), then timings of compiled generation, plain vs monitoring every
   layer x K + steering one layer, interleaved rounds, with the eager loop of both for reference.

Issue 11's GPU targets: compiled decode with monitoring + steering at most 5% over compiled plain decode, and
prefill throughput with recording at least 95% of plain.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import emovec  # noqa: E402
from emovec.bench.runner import NaiveHooks, emovec_backends, random_vectors  # noqa: E402
from emovec.bench.runner import _sync as sync  # noqa: E402
from emovec.bench.runner import _time as timed  # noqa: E402
from emovec.layers import find_decoder_layers, layer_output_hidden, replace_layer_output  # noqa: E402
from emovec.runtime import steering_vector  # noqa: E402
from harness import command_line, write_json  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def stats(v: list[float]) -> dict[str, float]:
    q = statistics.quantiles(v, n=5) if len(v) > 1 else [v[0]] * 4
    return {"p20_s": round(q[0], 5), "p50_s": round(statistics.median(v), 5), "p80_s": round(q[3], 5), "n": len(v)}


SHAPES = {  # config overrides for --shape: a random model of another size with the same tokenizer
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128),
}


def random_model(folder: Path, device: torch.device, dtype: torch.dtype, shape: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(folder))
    for key, value in SHAPES.get(shape, {}).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.emovec_tokenizer = tokenizer
    model.generation_config.eos_token_id = None  # a random model may emit it; every run keeps its full length
    return model, tokenizer, f"random weights, {folder.name}'s config" + (f" at the {shape} shape" if shape else "")


def layer_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's output hidden state of a plain forward pass (float64, on the CPU)."""
    outs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda m, a, o: outs.append(layer_output_hidden(o).double().cpu()))
               for layer in find_decoder_layers(model).layers]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved model folder (default: the default model)")
    parser.add_argument("--random-from", default=None, help="a folder with config.json + tokenizer: random weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--k", type=int, default=171)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens in the compiled-generation timings")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prefill", type=int, nargs=2, default=[8, 512], metavar=("BATCH", "TOKENS"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sections", nargs="+", default=["monitor", "steer", "prefill", "compiled"])
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: reduce-overhead on a GPU)")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="with --random-from: another size")
    parser.add_argument("--eager-only", action="store_true", help="the generation timings without compiling")
    parser.add_argument("--with-eager", action="store_true", help="time the eager loop too, next to the compiled")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    mode = args.mode or ("reduce-overhead" if device.type == "cuda" else None)
    compile_kwargs = {"mode": mode} if mode else {}
    out_path = Path(args.out or Path(__file__).parent / "results" / f"gpu_runtime_{device.type}.json")
    if args.random_from:
        model, tokenizer, name = random_model(Path(args.random_from), device, dtype, args.shape)
    else:
        model, tokenizer, name = emovec.load_model(args.model, device=str(device), dtype=dtype)
    # random directions with the model's own mean residual norms, so relative strengths move the logits well past
    # the dtype's rounding (with unit norms a bf16 model's steering effect is the size of its rounding noise)
    vectors = emovec.measure_mean_norms(model, random_vectors(model, args.k),
                                        ["Hello there, how are you today?", "The weather was mild and the sea calm."],
                                        tokenizer=tokenizer)
    num_layers = len(find_decoder_layers(model).layers)
    steer_layer = round(2 * (num_layers - 1) / 3)
    recipe = {vectors.names[0]: 0.3, vectors.names[1]: -0.2}
    backends = emovec_backends(device)
    g = torch.Generator().manual_seed(1)
    vocab = min(model.config.vocab_size, 30000)
    result: dict = {"model": name, "device": str(device), "dtype": str(dtype), "K": args.k, "layers": num_layers,
                    "steer_layer": steer_layer, "backends": backends, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                    "command": command_line(), "checks": {}}

    def save(section: str) -> None:
        write_json(out_path, result, quiet=True)
        print(f"[{section}] saved to {out_path}", flush=True)

    def check(section: str, name: str, value: float, limit: float) -> None:
        ok = value <= limit
        result["checks"][f"{section}: {name}"] = {"value": value, "limit": limit, "ok": ok}
        print(f"{'PASS' if ok else 'FAIL'} {section}: {name} = {value:.3g} (limit {limit:g})", flush=True)

    tol = 1e-2 if dtype != torch.float32 else 1e-5  # bf16 probes: ~2^-9 per element
    if "monitor" in args.sections:
        ids = torch.randint(100, vocab, (3, 40), generator=g).to(device)
        ref = layer_outputs(model, ids)
        unit = vectors.unit.double()
        for b in backends:
            with torch.no_grad(), emovec.monitor(model, vectors, "all", backend=b) as mon:
                model(input_ids=ids, use_cache=False)
            got = mon.result(decode=False)
            want_s = torch.stack([ref[i] @ unit[vectors.slice_of(i)].T for i in range(num_layers)], 2)
            want_n = torch.stack([ref[i].norm(dim=-1) for i in range(num_layers)], 2)
            check("monitor", f"{b} scores rel err", rel(got.scores, want_s), tol)
            check("monitor", f"{b} norms rel err", rel(got.norms, want_n), tol)
        save("monitor")
    if "steer" in args.sections:
        ids = torch.randint(100, vocab, (3, 40), generator=g).to(device)
        vec = steering_vector(vectors, recipe, steer_layer, relative=True).to(device)
        layer = find_decoder_layers(model).layers[steer_layer]

        def add(m, a, o):
            h = layer_output_hidden(o)
            return replace_layer_output(o, (h.float() + vec.float()).to(h.dtype))

        handle = layer.register_forward_hook(add)
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits.float()
        handle.remove()
        with torch.no_grad():
            plain = model(input_ids=ids, use_cache=False).logits.float()
        effect = result["steer_effect_rel"] = rel(want, plain)
        for b in backends:
            with torch.no_grad(), emovec.steer(model, vectors, recipe, [steer_layer], backend=b):
                got = model(input_ids=ids, use_cache=False).logits.float()
            check("steer", f"{b} logits' distance to the torch hook's / the steering's effect ({effect:.3g})",
                  float((got - want).double().norm() / (want - plain).double().norm().clamp_min(1e-30)),
                  0.1 if dtype != torch.float32 else 1e-4)
        save("steer")
    if "prefill" in args.sections:
        batch, tokens = args.prefill
        ids = torch.randint(100, vocab, (batch, tokens), generator=g).to(device)
        unit_dev = [vectors.unit[vectors.slice_of(i)].to(device) for i in range(num_layers)]

        def plain():
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)

        def emo(b):
            def run():
                with torch.no_grad(), emovec.monitor(model, vectors, "all", backend=b):
                    model(input_ids=ids, use_cache=False)
            return run

        def naive():
            with torch.no_grad(), NaiveHooks(model, unit_dev):
                model(input_ids=ids, use_cache=False)

        fns = {"plain": plain, "naive": naive, **{f"emovec-{b}": emo(b) for b in backends}}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        samples = {k: [] for k in fns}
        peak = {}
        for k, fn in fns.items():
            fn()
            if device.type == "cuda":
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                fn()
                peak[k] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        for _ in range(args.rounds):
            for k, fn in fns.items():
                samples[k].append(statistics.median(timed(fn, device) for _ in range(3)))
        base = statistics.median(samples["plain"])
        rows = [{"provider": k, **stats(v), "tokens_per_s": round(batch * tokens / statistics.median(v), 1),
                 "throughput_vs_plain": round(base / statistics.median(v), 4), "peak_mb": peak.get(k)}
                for k, v in samples.items()]
        result["prefill"] = {"batch": batch, "tokens": tokens, "rows": rows}
        for r in rows:
            print(f"prefill {batch}x{tokens} {r['provider']:14s} {r['tokens_per_s']:10.1f} tok/s  "
                  f"x{r['throughput_vs_plain']:.3f} of plain throughput  peak {r['peak_mb']} MB", flush=True)
        save("prefill")
    if "compiled" in args.sections:
        from torch._dynamo.utils import counters

        result["compiled"] = []
        for batch in args.batches:
            ids = torch.randint(100, vocab, (batch, 16), generator=g).to(device)
            kw = dict(vectors=vectors, monitor_layers="all", recipe=recipe, steer_layers=[steer_layer])

            def gen(compiled: bool, intervene: bool):
                def run(timings=None):
                    extra = dict(compile=True, compile_kwargs=compile_kwargs) if compiled else {}
                    return emovec.generate(model, ids, max_new_tokens=args.tokens, **(kw if intervene else {}),
                                           timings=timings, **extra)
                return run

            fns = {"compiled plain": gen(True, False), "compiled emovec": gen(True, True),
                   "eager plain": gen(False, False), "eager emovec": gen(False, True)}
            if args.eager_only:
                fns = {k: v for k, v in fns.items() if k.startswith("eager")}
            elif not args.with_eager:
                fns = {k: v for k, v in fns.items() if k.startswith("compiled")}
            first, outputs = {}, {}
            for k, fn in fns.items():
                t0 = time.perf_counter()
                outputs[k] = fn()
                sync(device)
                first[k] = round(time.perf_counter() - t0, 2)
                print(f"compiled b{batch}: {k} first call {first[k]} s", flush=True)
            samples = {k: [] for k in fns}
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    samples[k].append(timed(fn, device))
            rows = []
            for k, v in samples.items():
                base = statistics.median(samples[k.split()[0] + " plain"])
                rows.append({"provider": k, **stats(v), "first_call_s": first[k],
                             "tokens_per_s": round(batch * args.tokens / statistics.median(v), 1),
                             "time_vs_plain_same_mode": round(statistics.median(v) / base, 4)})
                print(f"compiled b{batch} {k:16s} {rows[-1]['tokens_per_s']:9.1f} tok/s  "
                      f"x{rows[-1]['time_vs_plain_same_mode']:.3f} of plain in the same mode "
                      f"(p20-p80 {rows[-1]['p20_s']:.4f}-{rows[-1]['p80_s']:.4f} s)", flush=True)
            entry = {"batch": batch, "tokens": args.tokens, "mode": mode, "rows": rows, "checks": []}
            result["compiled"].append(entry)
            save(f"compiled b{batch} timings")
            # the compiled graphs against the eager loop: this call, then a call with other prompts and another
            # recipe, which must reuse the graphs (no new ones)
            for call in range(2 if not args.eager_only else 0):
                if call == 0:
                    compiled = outputs["compiled emovec"]
                    eager = outputs.get("eager emovec") or gen(False, True)()
                    graphs = None
                else:
                    other = dict(kw, recipe={vectors.names[2]: 0.5})
                    ids2 = torch.randint(100, vocab, (batch, 16), generator=g).to(device)
                    before = counters["stats"].get("unique_graphs", 0)
                    compiled = emovec.generate(model, ids2, max_new_tokens=args.tokens, compile=True,
                                               compile_kwargs=compile_kwargs, **other)
                    graphs = counters["stats"].get("unique_graphs", 0) - before
                    eager = emovec.generate(model, ids2, max_new_tokens=args.tokens, **other)
                agree = (compiled.sequences == eager.sequences).float().mean().item()
                diverged = (compiled.sequences != eager.sequences).any(0).nonzero()
                upto = int(diverged[0]) if len(diverged) else compiled.sequences.shape[1]
                width = max(upto - 1, 16)  # the prompt and the tokens before the first divergence
                entry["checks"].append({"call": call + 1, "token_agreement": agree, "first_divergent_column": upto,
                                        "new_graphs": graphs, "scores_rel_err": rel(compiled.monitor.scores[:, :width],
                                                                                    eager.monitor.scores[:, :width])})
                print(f"compiled b{batch} vs eager, call {call + 1}: {entry['checks'][-1]}", flush=True)
            if entry["checks"]:
                check("compiled", f"b{batch} second call's new graphs", entry["checks"][1]["new_graphs"], 0)
                check("compiled", f"b{batch} compiled vs eager scores rel err",
                      max(c["scores_rel_err"] for c in entry["checks"]), 2 * tol)
            entry["cudagraph_skips"] = counters["inductor"].get("cudagraph_skips", 0)
            # where each provider's time goes: one more call each, with the device synchronised between phases
            for row in rows:
                laps: dict = {}
                fns[row["provider"]](laps)
                row["laps_ms"] = {k: round(1e3 * v, 2) for k, v in laps.items()}
                row["decode_step_ms"] = round(1e3 * laps["decode_s"] / max(args.tokens - 1, 1), 4)
                print(f"compiled b{batch} {row['provider']:16s} laps {row['laps_ms']}  decode step "
                      f"{row['decode_step_ms']} ms", flush=True)
            save(f"compiled b{batch}")
    failed = [k for k, v in result["checks"].items() if not v["ok"]]
    print(f"checks: {len(result['checks']) - len(failed)} passed, {len(failed)} failed {failed}", flush=True)
    return result


if __name__ == "__main__":
    main()
