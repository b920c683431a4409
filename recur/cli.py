"""The ``recur`` command line: ``recur train | eval | sample``.

    recur train  --config configs/char_lm.py[:variant,...] --workdir runs/NAME [--config.model.hidden=256 ...]
    recur eval   --workdir runs/NAME [--which best|latest]
    recur eval   --workdir runs/A runs/B ... [--which best|latest]   (classifiers: an ensemble)
    recur sample --workdir runs/NAME [--prompt "ROMEO:"] [--length 500] [--temperature 0.8] [--top_k 0] [--seed 0]

``train`` resumes from the workdir's latest checkpoint when there is one.
"""
from __future__ import annotations

import argparse
import json
import sys


def _split_overrides(argv):
    """Separates ``--config.a.b=value`` / ``--config.a.b value`` pairs from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"recur: {arg} needs a value")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    argv, overrides = _split_overrides(argv)
    parser = argparse.ArgumentParser(prog="recur", description="Train, evaluate and sample recurrent networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model from a config")
    p_train.add_argument("--config", required=True, help="path/to/config.py[:variant,key=value,...]")
    p_train.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard events go here")
    p_eval = sub.add_parser("eval", help="evaluate a trained model")
    p_eval.add_argument("--workdir", required=True, nargs="+",
                        help="a trained run; several classification runs are evaluated as an ensemble "
                             "(mean of their class probabilities)")
    p_eval.add_argument("--which", default="best", choices=["best", "latest"])
    p_sample = sub.add_parser("sample", help="generate text from a trained language model")
    p_sample.add_argument("--workdir", required=True)
    p_sample.add_argument("--prompt", default=None)
    p_sample.add_argument("--length", type=int, default=None)
    p_sample.add_argument("--temperature", type=float, default=None)
    p_sample.add_argument("--top_k", type=int, default=None)
    p_sample.add_argument("--seed", type=int, default=0)
    p_sample.add_argument("--which", default="best", choices=["best", "latest"])
    args = parser.parse_args(argv)
    if overrides and args.command != "train":
        parser.error("--config.KEY overrides apply to `recur train` only")
    show_notices()
    try:
        if args.command == "train":
            return _train(args, overrides)
        if args.command == "eval":
            return _eval(args)
        return _sample(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"recur {args.command}: error: {e}", file=sys.stderr)
        return 2


def show_notices():
    """recur's INFO messages (what ``scan_mode="auto"`` measured and took on a GPU) on stderr,
    which keeps stdout for results; once, unless the "recur" logger already has a handler."""
    import logging

    log = logging.getLogger("recur")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _train(args, overrides):
    from recur import config as config_lib
    from recur.train import run

    config = config_lib.load(args.config, overrides)
    run.train(config, args.workdir)
    return 0


def _eval(args):
    if len(args.workdir) > 1:
        from recur.train import ensemble

        print(json.dumps(ensemble.evaluate_ensemble(args.workdir, args.which), indent=2))
        return 0
    from recur.train import run

    print(json.dumps(run.evaluate_workdir(args.workdir[0], args.which), indent=2))
    return 0


def _sample(args):
    import jax

    from recur.train import lm

    model, vocab, config = lm.load_for_inference(args.workdir, args.which)
    s = config.sample
    prompt = s.prompt if args.prompt is None else args.prompt
    tokens = list(prompt) if config.data.name == "tinyshakespeare" else prompt.split()
    if not tokens:
        raise ValueError("the prompt is empty: give at least one token to start from")
    ids = vocab.encode(tokens)
    out = lm.generate(model, ids, args.length or s.length, key=jax.random.key(args.seed),
                      temperature=s.temperature if args.temperature is None else args.temperature,
                      top_k=s.top_k if args.top_k is None else args.top_k)
    sep = "" if config.data.name == "tinyshakespeare" else " "
    print(sep.join(tokens) + sep + sep.join(vocab.decode(out.tolist())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
