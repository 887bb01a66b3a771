"""Test setup: Triton runs under its interpreter when there is no GPU (must be set before triton is imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--device", default=None, help="device for op tests (default: cuda if available, else cpu)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(scope="session")
def default_model():
    """The default model (SmolLM2-135M-Instruct), loaded once per test session from emovec's cache."""
    import emovec

    return emovec.load_model()


# concept names of the random vector file the CLI tests use
CLI_NAMES = ["calm", "afraid", "happy", "sad", "desperate", "loving"]


@pytest.fixture(scope="module")
def loaded():
    """The default model, through the CLI's cache: the commands below reuse it instead of loading it again.

    The slow tests run torch on one thread: this small model gains little from more, and on a machine whose cores
    are busy with other work, torch's thread pool can make a short greedy generation tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from emovec import cli

        yield cli._load_model(None, None)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vector_file(loaded, tmp_path_factory):
    """A vector file of random directions for the default model (never the default emotion vectors)."""
    import emovec
    from emovec.vectors import VectorSet

    torch.manual_seed(0)
    vectors = VectorSet.from_tensor(torch.randn(30, len(CLI_NAMES), 576), names=CLI_NAMES, layers=list(range(30)))
    vectors = emovec.measure_mean_norms(loaded.model, vectors, ["Hello, how are you today?",
                                                                "The cat sat on the mat and looked out."])
    return vectors.save(tmp_path_factory.mktemp("vectors") / "random.safetensors")


TINY_NAMES = ["afraid", "calm", "desperate", "nervous", "happy", "sad", "at ease", "loving"]


@pytest.fixture(scope="session")
def tiny_chat_model():
    """A tiny random Llama with the default model's tokenizer (and chat template), and random vectors named after
    eight emotions at its three layers, with mean norms: fast stand-ins for the experiments and sweeps."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import emovec
    from emovec.models import _gguf_model_folder
    from emovec.vectors import VectorSet

    tokenizer = AutoTokenizer.from_pretrained(str(_gguf_model_folder()))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model.emovec_tokenizer = tokenizer
    g = torch.Generator().manual_seed(1)
    vectors = VectorSet(TINY_NAMES, [0, 1, 2], torch.randn(3, len(TINY_NAMES), 32, generator=g), default_layer=1)
    vectors = emovec.measure_mean_norms(model, vectors, ["Hello there, how are you?", "The weather is mild."],
                                        tokenizer=tokenizer)
    return model, tokenizer, vectors


RUNTIME_NAMES = ["calm", "afraid", "happy", "sad", "desperate"]


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama (4 layers, hidden 64) and random vectors with mean norms at every layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from emovec.vectors import VectorSet

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, pad_token_id=0,
                         eos_token_id=299, bos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # a random model may emit it; tests compare full-length outputs
    vectors = VectorSet.from_tensor(torch.randn(4, len(RUNTIME_NAMES), 64), RUNTIME_NAMES, layers=[0, 1, 2, 3],
                                    mean_norms=[1.0, 2.0, 3.0, 4.0])
    return model, vectors


def pytest_runtest_logreport(report):
    """With EMOVEC_FAILURE_LOG set, every failure's traceback is appended to that file as soon as it happens (also
    from pytest-xdist workers): a run cut off by a time limit, as on a lent GPU machine, still says what failed."""
    path = os.environ.get("EMOVEC_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as handle:
            handle.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext}\n")
