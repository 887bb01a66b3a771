"""CLI commands for data and extraction: ``emovec extract`` and ``emovec stories generate``."""

from __future__ import annotations

import time

import click

from emovec.cli import UserError, _load_model, _one_line, _user_errors, main


def _load(model_name: str | None):
    with _user_errors():
        return _load_model(model_name)


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@main.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="vector file to write (.safetensors)")
@click.option("--model", "model_name", default=None, help="model name or folder (default: SmolLM2-135M-Instruct)")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="labelled JSONL (text + label or emotion); default: the packaged emotion stories")
@click.option("--neutral", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSONL of neutral texts (field 'text') for denoising; default: the packaged neutral dialogues")
@click.option("--labels", "--emotions", "labels", default=None, help="comma-separated subset of labels")
@click.option("--layers", default="all", show_default=True, help="layers: all, 10, -1, 0.66, 3,5,7, 10-14")
@click.option("--start-token", default=50, show_default=True, help="skip each story's first tokens")
@click.option("--denoise-variance", default=0.5, show_default=True, help="neutral variance to project out (0 = off)")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-length", default=512, show_default=True, help="truncate texts to this many tokens")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.option("--on-error", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
              help="a bad line in --data/--neutral (not JSON, not an object, no text): stop, or skip and count it")
@click.option("--restart", is_flag=True, help="ignore any checkpoint next to OUT and start over")
def extract(out, model_name, data, neutral, labels, layers, start_token, denoise_variance, batch_size, max_length, quiet,
            on_error, restart):
    """Extract concept vectors (default: the 171 emotions) and save them as a VectorSet file.

    Progress is checkpointed next to OUT (OUT.partial.safetensors); rerunning the same command after an
    interruption resumes.
    """
    from emovec.cli import _check_outputs
    from emovec.corpus import read_records
    from emovec.extraction import extract as run_extract

    _check_outputs(out)
    mode = "raise" if on_error == "stop" else "skip"
    with _user_errors():
        stories, skipped = read_records(data, ["text", "label|emotion"], mode) if data else (None, 0)
        neutral_rows, skipped_neutral = read_records(neutral, ["text"], mode) if neutral else (None, 0)
    for count, path in ((skipped, data), (skipped_neutral, neutral)):
        if count:
            click.echo(f"emovec: skipped {count} bad line(s) of {path}", err=True)
    model, tokenizer, name = _load(model_name)
    neutral_texts = [row["text"] for row in neutral_rows] if neutral_rows is not None else None
    started = time.perf_counter()
    try:
        vectors = run_extract(model, tokenizer, stories=stories, neutral=neutral_texts, layers=layers,
                              start_token=start_token, denoise_variance=denoise_variance, batch_size=batch_size,
                              max_length=max_length, labels=_names(labels), progress=not quiet,
                              checkpoint=str(out) + ".partial.safetensors", restart=restart, out=out)
    except (ValueError, KeyError) as error:
        raise UserError(_one_line(error)) from None
    except OSError as error:
        raise UserError(f"cannot write {out}: {error.strerror or error}") from None
    click.echo(f"wrote {out}: {len(vectors.names)} vectors x {len(vectors.layers)} layers (hidden "
               f"{vectors.hidden_size}) from {vectors.metadata['num_stories']} texts in "
               f"{time.perf_counter() - started:.0f} s; default layer {vectors.default_layer}")
    if vectors.metadata.get("short_story_fallbacks"):
        click.echo(f"note: {vectors.metadata['short_story_fallbacks']} text(s) were shorter than --start-token "
                   f"{start_token}; their second half was used", err=True)


@main.group()
def stories() -> None:
    """Emotion stories: regenerate a corpus with a local chat model."""


@stories.command("generate")
@click.option("--model", "model_name", default=None, help="a local chat model (default: SmolLM2-135M-Instruct)")
@click.option("--per-emotion", default=6, show_default=True)
@click.option("--out", default="stories.jsonl", show_default=True, type=click.Path(dir_okay=False))
@click.option("--emotions", default=None, help="comma-separated subset (default: all 171)")
@click.option("--attempts", default=4, show_default=True, help="drafts per story before giving up")
@click.option("--max-new-tokens", default=260, show_default=True)
@click.option("--seed", default=0, show_default=True)
def stories_generate(model_name, per_emotion, out, emotions, attempts, max_new_tokens, seed):
    """Write PER_EMOTION stories per emotion; drafts that use the emotion's word family are discarded."""
    from emovec.corpus import load_emotions
    from emovec.stories import chat_generator, generate_stories

    names = _names(emotions) or load_emotions()
    unknown = [n for n in names if n not in load_emotions()]
    if unknown:
        raise UserError(f"unknown emotion(s) {unknown}; see python/emovec/data/emotions.txt for the 171 names")
    model, tokenizer, _ = _load(model_name)
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("this model's tokenizer has no chat template; stories generate needs a chat model")
    generate = chat_generator(model, tokenizer, max_new_tokens=max_new_tokens, seed=seed)
    from tqdm.auto import tqdm

    with tqdm(total=len(names), desc="emotions") as bar:
        stats = generate_stories(generate, names, per_emotion, out, attempts=attempts, seed=seed, progress=bar.update)
    click.echo(f"wrote {out}: {stats['accepted']} new stories accepted, {stats['rejected']} drafts rejected "
               f"({stats['resumed']} kept from an earlier run)")
