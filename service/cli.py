"""The `edm-serve` console script: one entry point, one module per subcommand.

Subcommands are resolved lazily so that `edm-serve gateway` never imports torch and
`edm-serve sample` never imports FastAPI. Each target is a `main(argv) -> int` function.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "sample": ("model.cli", "sample_main", "generate PNGs from a checkpoint (like NVlabs generate.py)"),
    "inspect": ("model.cli", "inspect_main", "print a checkpoint's model card as JSON"),
    "convert": ("model.cli", "convert_main", "convert an NVlabs pickle to safetensors + model card"),
    "models": ("model.cli", "models_main", "list the official EDM checkpoints by name, marking cached ones"),
    "pull": ("model.cli", "pull_main", "download (and convert) models by name or URL into the cache"),
    "train": ("model.train_cli", "main", "train a model with the EDM recipe"),
    "eval": ("model.eval_cli", "main", "measure class accuracy and Frechet distance of samples"),
    "gateway": ("service.main", "main", "run the REST (and gRPC) gateway"),
    "worker": ("worker.main", "main", "run a batching GPU/CPU worker"),
    "up": ("service.up", "main", "run Redis, a worker and the gateway together on this machine"),
    "generate": ("service.client", "main", "call a running server (gRPC), optionally streaming frames"),
}


def _usage() -> str:
    lines = ["usage: edm-serve COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `edm-serve COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"edm-serve: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
