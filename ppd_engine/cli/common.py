"""The one CLI vocabulary every command speaks: device, dtype, progress, judge flags, checkpoint,
and one-line errors with a non-zero exit.

    --device auto|cpu|cuda|cuda:N     default auto (cuda when available, else cpu)
    --dtype fp32|bf16|fp16            the one dtype table (ppd_engine.dtypes); aliases accepted
    --progress / --no-progress        progress bars (default on)
    --checkpoint latest|step-N|DIR    which checkpoint of a run (--run RUN) to use
    --judge local|http --judge-model … the VLM judge, spelled the same in `judge` and `eval`
    --debug                           show the traceback of an input error instead of one line

Logging: every command logs INFO and up to stderr through tqdm.write (TqdmLoggingHandler), so a
log line never lands inside a progress bar's line, whichever bar is showing.

Exit codes: 0 success, 2 usage or input error (one line on stderr, naming the file, key or flag),
3 training stopped on bad steps, 4 a peer rank stopped answering (training/distributed.py
Heartbeat), 1 a bug (traceback). docs/RELIABILITY.md lists what the engine promises.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

from ppd_engine.dtypes import CANONICAL, canonical_dtype

EXIT_INPUT = 2


class UsageError(ValueError):
    """The command line itself is wrong (a bad flag or value); printed as one line, exit 2."""


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every option's default: appended unless the help text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.option_strings == []:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        return text + " (default: %(default)s)"


def resolve_device(name: str | None) -> str:
    """'auto' (or None) -> 'cuda' when available else 'cpu'; otherwise the name, checked."""
    import torch

    name = (name or "auto").strip()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu" or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        return name
    raise UsageError(f"--device {name!r}: choose auto | cpu | cuda | cuda:N")


def add_device(p: argparse.ArgumentParser, help: str = "where to run") -> None:
    p.add_argument("--device", default="auto", help=f"{help}: auto (cuda when available, else cpu) | cpu | cuda | "
                                                    "cuda:N (default: auto)")


def _dtype_arg(value: str) -> str:
    try:
        return canonical_dtype(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_dtype(p: argparse.ArgumentParser, default: str | None, help: str, flag: str = "--dtype") -> None:
    """A dtype flag read through the one table; `default` None = chosen per device (said in `help`)."""
    p.add_argument(flag, type=_dtype_arg, default=default, metavar="|".join(CANONICAL),
                   help=f"{help} (default: {default or 'bf16 on cuda, fp32 on cpu'})")


def device_dtype(dtype: str | None, device: str) -> str:
    """A per-device default dtype: bf16 on CUDA, fp32 elsewhere."""
    return dtype or ("bf16" if str(device).startswith("cuda") else "fp32")


def add_data(p, what: str, split: str | None, split_help: str = "the split read") -> None:
    """--data / --split / --streaming: where Pick-a-Pic pairs are, spelled the same in every command
    (ppd_engine/data/sources.py resolves them)."""
    p.add_argument("--data", required=True, help=f"{what}: a folder of Pick-a-Pic v2 parquet files (or one file), "
                                                 "a `datasets` save_to_disk folder, an fsspec URL (hf://, s3://) "
                                                 "or a hub dataset id owner/name")
    p.add_argument("--split", default=split, help=f"{split_help}: files named SPLIT-NNNNN-of-NNNNN-*.parquet, or "
                                                  f"a DatasetDict's / hub dataset's split (default: "
                                                  f"{split or 'every file; refused if there are several splits'})")
    p.add_argument("--streaming", action="store_true",
                   help="read a hub id in place from the hub's parquet files instead of downloading it with "
                        "datasets.load_dataset (default: off)")
    p.add_argument("--columns", default=None, metavar="FIELD=COLUMN,...",
                   help="the data is a user's own, not Pick-a-Pic's schema: which column holds each field, as "
                        "training's data.columns (data.format=columns): prompt, image_0 + image_1 with label or "
                        "label_0[,label_1], or chosen + rejected; user_id; e.g. prompt=text,chosen=win,"
                        "rejected=lose,user_id=worker (default: Pick-a-Pic's columns)")


def data_columns(args):
    """The ColumnMap of --columns (None: Pick-a-Pic's schema); a bad mapping is a UsageError."""
    if not getattr(args, "columns", None):
        return None
    from ppd_engine.data.columns import ColumnMap

    mapping = {}
    for item in args.columns.split(","):
        field_, sep, column = item.partition("=")
        if not sep or not field_.strip() or not column.strip():
            raise UsageError(f"--columns {args.columns!r}: each entry is FIELD=COLUMN, got {item!r}")
        mapping[field_.strip()] = column.strip()
    try:
        return ColumnMap.parse(mapping, key="--columns")
    except ValueError as e:
        raise UsageError(str(e)) from None


def quiet_library_bars() -> None:
    """Turn off the libraries' own progress bars (downloads, weight loading, pipeline components):
    HF_HUB_DISABLE_PROGRESS_BARS is the one switch huggingface_hub, transformers and datasets read;
    modules already imported are told directly, and the model loaders bring diffusers in line
    (models.resolve_source)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        module = sys.modules.get(name)
        if module is not None:
            module.disable_progress_bar()
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None:
        hub.disable_progress_bars()


class _ProgressAction(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        if not getattr(namespace, self.dest):
            quiet_library_bars()


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=_ProgressAction, default=True,
                   help="show progress bars, the libraries' too (default: on; --no-progress turns them all off)")


def add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="latest", metavar="latest|step-N|DIR",
                   help="which checkpoint of the run: latest, step-N (inside RUN/checkpoints), or a "
                        "step-N folder path (default: latest)")


def add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true",
                   help="on an input error, show the full traceback instead of one line")


def add_judge(p: argparse.ArgumentParser, required: bool) -> argparse._ArgumentGroup:
    """The VLM judge's flags, spelled the same in every command that judges."""
    from ppd_engine.judge.backends import ENV_API_KEY, ENV_BASE_URL

    title = "VLM judge" if required else "VLM judge (optional; skipped unless --judge is given)"
    g = p.add_argument_group(title)
    g.add_argument("--judge", default="local" if required else None, choices=("local", "http"),
                   help="judge backend: 'local' = a transformers VLM (LLaVA-OneVision, Qwen2-VL) named by "
                        f"--judge-model; 'http' = an OpenAI-compatible endpoint, URL and key from ${ENV_BASE_URL} "
                        f"/ ${ENV_API_KEY} (else $OPENAI_BASE_URL / $OPENAI_API_KEY; redirects refused); each "
                        "pair is asked in both orders and kept only when the answers agree"
                        + (" (default: local)" if required else ""))
    g.add_argument("--judge-model", default=None, required=required,
                   help="judge VLM folder / hub id (local), or the endpoint's model name (http)")
    g.add_argument("--judge-shots", type=int, default=4, help="few-shot pairs shown per user (default: 4)")
    g.add_argument("--judge-seed", type=int, default=0,
                   help="seed of the few-shot split, query choice, A/B placement and sampling (default: 0)")
    g.add_argument("--judge-temperature", type=float, default=1.0, help="sampling temperature (default: 1.0, paper)")
    g.add_argument("--judge-top-p", type=float, default=1.0, help="nucleus truncation (default: 1.0 = none)")
    g.add_argument("--judge-max-new-tokens", type=int, default=1024,
                   help="answer budget: chain of thought + prediction (default: 1024)")
    g.add_argument("--judge-batch", type=int, default=4, help="local: prompts decoded together (default: 4)")
    g.add_argument("--judge-timeout", type=float, default=120.0, help="http: seconds per request (default: 120)")
    g.add_argument("--judge-retries", type=int, default=5, help="http: retries on 429/5xx/timeouts (default: 5)")
    g.add_argument("--judge-workers", type=int, default=4, help="http: requests in flight at once (default: 4)")
    g.add_argument("--judge-template", default=None,
                   help="prompt template (default: ppd_engine/embed/profile_prompt.txt)")
    add_dtype(g, None, "local judge dtype", flag="--judge-dtype")
    return g


def make_judge_backend(args, device: str):
    """The backend named by the add_judge flags."""
    from ppd_engine.judge.backends import make_backend

    return make_backend(args.judge, args.judge_model, device=device,
                        dtype=device_dtype(args.judge_dtype, device), temperature=args.judge_temperature,
                        top_p=args.judge_top_p, max_new_tokens=args.judge_max_new_tokens, batch=args.judge_batch,
                        timeout=args.judge_timeout, max_retries=args.judge_retries, workers=args.judge_workers)


def _debug_requested(argv) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("PPD_DEBUG", "") not in ("", "0")


class TqdmLoggingHandler(logging.StreamHandler):
    """A stderr handler that writes through tqdm.write: the progress bars showing are cleared, the
    line is written, and they are drawn again below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise; the logging module's own policy
            self.handleError(record)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "fsspec", "filelock")


def setup_logging(level: int = logging.INFO) -> None:
    """The commands' logging: INFO and up on stderr through tqdm. Leaves a root logger that is
    already configured (an embedding application, pytest's capture) as it is."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = TqdmLoggingHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # HTTP clients log every request at INFO (a streamed dataset makes thousands of range requests).
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def cli_errors(main):
    """Wrap a command's main(argv): logging set up (setup_logging); input errors become one line on
    stderr and exit 2.

    Input errors: ConfigError/UsageError/ValueError, missing files, KeyError (a name that is not
    there), OSError. With --debug (or PPD_DEBUG=1) the traceback is shown instead."""

    @functools.wraps(main)
    def wrapper(argv=None):
        setup_logging()
        try:
            return main(argv)
        except (ValueError, KeyError, OSError) as exc:
            if _debug_requested(argv):
                raise
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"error: {msg}", file=sys.stderr)
            return EXIT_INPUT
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
