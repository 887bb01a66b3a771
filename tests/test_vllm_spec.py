"""The vLLM plugin's request settings: parsing and checks, without vLLM (runs in the main environment)."""

import pytest
import torch

from emovec.integrations import vllm as ev
from emovec.integrations.vllm import spec as sp
from emovec.vectors import VectorSet

NAMES = ["afraid", "calm", "desperate", "happy"]


@pytest.fixture()
def vectors():
    torch.manual_seed(0)
    vs = VectorSet.from_tensor(torch.randn(4, len(NAMES), 8), names=NAMES, layers=[2, 3, 4, 5])
    vs.mean_norms = torch.tensor([1.0, 2.0, 3.0, 4.0])
    vs.default_layer = 3
    return vs


def test_extra_args_round_trip_through_parse(vectors):
    extra = ev.extra_args(steer={"calm": 0.05, "desperate": -0.02}, layers="3-4", cap="desperate<=0.02",
                          floor="calm>=0", monitor=["afraid", "happy"], monitor_layers="2,5", prompt=True, key="k1")
    spec = sp.parse(extra, vectors, num_layers=6)
    assert spec.steer == {"calm": 0.05, "desperate": -0.02}
    assert spec.steer_layers == [3, 4]
    assert spec.bounds == {"calm": (0.0, None), "desperate": (None, 0.02)}
    assert spec.regulate_layers == [3, 4]  # default: the steered layers
    assert spec.monitor == ["afraid", "happy"] and spec.monitor_index == [0, 3]
    assert spec.monitor_layers == [2, 5]
    assert spec.prompt and spec.key == "k1" and spec.relative and spec.edits


def test_server_style_values_parse_like_offline_ones(vectors):
    """vllm_xargs carries only strings and numbers: the same settings as strings parse to the same spec."""
    offline = sp.parse(ev.extra_args(steer="calm=0.1", monitor="all"), vectors, 6)
    server = sp.parse({"emovec_steer": "calm = 0.1", "emovec_monitor": "all", "emovec_absolute": "false",
                       "emovec_prompt": 0}, vectors, 6)
    assert offline == server
    assert server.monitor == NAMES and server.steer_layers == [3] and server.monitor_layers == [3]


def test_edit_key_separates_what_changes_the_stream(vectors):
    a = sp.parse({"emovec_steer": "calm=0.1", "emovec_monitor": "afraid"}, vectors, 6)
    b = sp.parse({"emovec_steer": "calm=0.1"}, vectors, 6)
    c = sp.parse({"emovec_steer": "calm=0.1", "emovec_layers": "4"}, vectors, 6)
    d = sp.parse({"emovec_steer": "calm=0.1", "emovec_absolute": 1}, vectors, 6)
    assert a.edit_key() == b.edit_key()  # monitoring does not change the stream
    assert len({b.edit_key(), c.edit_key(), d.edit_key()}) == 3
    assert not sp.parse({"emovec_monitor": "calm"}, vectors, 6).edits


@pytest.mark.parametrize("extra, message", [
    ({"emovec_steer": "calm"}, "NAME=STRENGTH"),
    ({"emovec_steer": "calm=abc"}, "must be a number"),
    ({"emovec_steer": "calm=inf"}, "finite"),
    ({"emovec_steer": "calm=0.1,calm=0.2"}, "given twice"),
    ({"emovec_steer": "clam=0.1"}, "Did you mean 'calm'"),
    ({"emovec_monitor": "afriad"}, "Did you mean 'afraid'"),
    ({"emovec_steer": "calm=0.1", "emovec_layers": "1"}, "not at layer 1"),
    ({"emovec_monitor": "calm", "emovec_monitor_layers": "9"}, "layer"),
    ({"emovec_cap": "calm<=1.5"}, "between -1 and 1"),
    ({"emovec_cap": "calm>=0.1"}, "NAME<=COSINE"),
    ({"emovec_cap": "calm<=0.1", "emovec_floor": "calm>=0.2"}, "above the cap"),
    ({"emovec_prompt": "maybe"}, "true or false"),
    ({"emovec_stear": "calm=0.1"}, "unknown emovec setting"),
    ({"emovec_steer": 3}, "must be a string"),
])
def test_bad_settings_say_what_is_wrong(vectors, extra, message):
    with pytest.raises(sp.SpecError, match=message):
        sp.parse(extra, vectors, 6)


def test_relative_strength_needs_mean_norms(vectors):
    vectors.mean_norms = None
    with pytest.raises(sp.SpecError, match="emovec_absolute=1"):
        sp.parse({"emovec_steer": "calm=0.1"}, vectors, 6)
    assert sp.parse({"emovec_steer": "calm=0.1", "emovec_absolute": 1}, vectors, 6).relative is False


def test_salt_only_for_requests_that_edit_or_read_their_prompt():
    assert ev._salt(None, "r1") is None
    assert ev._salt({"emovec_monitor": "calm"}, "r1") is None  # reads generated tokens only: cache is fine
    steer = ev._salt({"emovec_steer": "calm=0.1"}, "r1")
    assert steer == ev._salt({"emovec_steer": "calm=0.1", "emovec_monitor": "afraid"}, "r2")  # shared by setting
    assert steer != ev._salt({"emovec_steer": "calm=0.2"}, "r1")
    prompt = ev._salt({"emovec_monitor": "calm", "emovec_prompt": 1}, "r1")
    assert prompt and prompt != ev._salt({"emovec_monitor": "calm", "emovec_prompt": 1}, "r2")  # its own


def test_external_request_id():
    from emovec.integrations.vllm.worker import _external

    assert _external("chatcmpl-abc-1f2e3d4c") == "chatcmpl-abc"
    assert _external("7-0a1b2c3d") == "7"
    assert _external("my-key") == "my-key"


def test_readings_keys_match_only_what_vllm_derives_from_them():
    from emovec.integrations.vllm.worker import _matches

    assert _matches("cmpl-abc", "cmpl-abc")
    assert _matches("cmpl-abc", "cmpl-abc-0") and _matches("cmpl-abc", "cmpl-abc-12")  # one per prompt
    assert _matches("7", "0_7") and _matches("7", "1_7")  # the n > 1 samples
    assert not _matches("cmpl", "cmpl-abc-0")  # a prefix is not a key
    assert not _matches("a", "a-b") and not _matches("7", "17") and not _matches("abc", "xabc")
    assert not _matches("a.c", "abc")  # keys are literal, not patterns


def test_readings_travel_as_bytes_and_come_back_as_the_recorded_arrays():
    """What the worker records (chunks, a recomputed position among them) comes back through a pickle (the route of
    vLLM's RPC between processes) as the same float32 arrays, ordered by position with the last write winning; the
    server's JSON form holds the same numbers as lists."""
    import pickle

    import numpy as np

    from emovec.integrations.vllm.worker import _Readings

    rng = np.random.default_rng(0)
    layers, names = [2, 5, 7], ["afraid", "calm"]
    r = _Readings(key="k", request="r", names=names, layers=layers, prompt_len=4)
    first = (3, rng.standard_normal((3, 3, 2)).astype(np.float32),
             rng.random((3, 3)).astype(np.float32))
    again = (5, rng.standard_normal((2, 3, 2)).astype(np.float32), rng.random((2, 3)).astype(np.float32))
    r.chunks = [first, again]
    data = pickle.loads(pickle.dumps(r.export()))
    assert isinstance(data["scores"], bytes)  # not 64 x 30 x 171 Python floats
    got = ev.decoded(data)
    want_scores = np.concatenate([first[1][:2], again[1]])  # position 5 recomputed: its second reading wins
    want_norms = np.concatenate([first[2][:2], again[2]])
    assert got["positions"].tolist() == [3, 4, 5, 6]
    assert got["scores"].dtype == np.float32 and got["scores"].flags.writeable
    np.testing.assert_array_equal(got["scores"], want_scores)
    np.testing.assert_array_equal(got["norms"], want_norms)
    readings = ev._readings_from(data)
    np.testing.assert_array_equal(readings.scores, want_scores)
    np.testing.assert_array_equal(readings.cosine, want_scores / want_norms[..., None])
    assert readings.series("calm", 7).tolist() == want_scores[:, 2, 1].tolist()
    as_json = ev.json_ready(data)
    assert as_json["scores"] == want_scores.tolist() and as_json["positions"] == [3, 4, 5, 6]
    np.testing.assert_array_equal(ev.decoded(as_json)["scores"], want_scores)  # lists decode too
    empty = ev.decoded(_Readings(key="k", request="r", names=names, layers=layers, prompt_len=4).export())
    assert empty["scores"].shape == (0, 3, 2) and empty["norms"].shape == (0, 3)
    failed = _Readings(key="k", request="r", names=names, layers=layers, prompt_len=4, error="no such emotion")
    assert ev.json_ready(failed.export())["error"] == "no such emotion"
    with pytest.raises(ev.SpecError, match="no such emotion"):
        ev._readings_from(failed.export())


def test_fused_call_writes_a_layer_column_of_the_cpu_record():
    """The plugin keeps a CPU step's readings in one record [tokens, layers, concepts]; a layer's column is strided,
    which the fused op does not write: _fused goes through a scratch, and the column equals the reference while
    the other layers' columns stay untouched."""
    from emovec.integrations.vllm.worker import _Plugin
    from emovec.reference import steer_project_reference

    torch.manual_seed(1)
    rows, layers, k, d = 5, 3, 7, 16
    record, record_norms = torch.zeros(9, layers, k), torch.zeros(9, layers)
    x = torch.randn(rows, d)
    probes = torch.nn.functional.normalize(torch.randn(k, d), dim=1)
    table, slots = torch.randn(2, d), torch.tensor([0, -1, 1, 1, -1])
    want_scores, want_norms = torch.zeros(rows, k), torch.zeros(rows)
    ref_x = x.double()
    steer_project_reference(ref_x, slots, table.double(), None, probes.double(), None, want_scores, want_norms,
                            None, None, None)
    _Plugin._fused(x, {"slots": slots, "table": table, "probes": probes, "scores": record[:rows, 1],
                       "norms": record_norms[:rows, 1]})
    torch.testing.assert_close(x, ref_x.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(record[:rows, 1], want_scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(record_norms[:rows, 1], want_norms, atol=1e-4, rtol=1e-4)
    assert not record[:, [0, 2]].any() and not record_norms[:, [0, 2]].any() and not record[rows:].any()
