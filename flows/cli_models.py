"""The commands on packaged models: `regraft models` lists them, `regraft promote` and `regraft rollback` change
which one is in production."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.errors import EXIT_OK


def command_models(args: argparse.Namespace, project: Path) -> int:
    import json

    from tasks.config import load_params
    from tasks.errors import EXIT_BUSY, EXIT_CHECK_FAILED
    from tasks.promotion import interrupted_promotion
    from tasks.registry import journal_file, read_record, sync_record
    from tasks.remote import RemoteError, model_remote
    from tasks.render import models_text

    params = load_params(project / "params.yaml")
    unreachable = None
    try:
        record = sync_record(params.paths.registry, model_remote(params))  # the shared remote's record, when there is one
    except RemoteError as exc:
        if not journal_file(params.paths.registry).is_file():
            raise
        record, unreachable = read_record(params.paths.registry), exc  # an interruption is still worth reporting
    interrupted = interrupted_promotion(params, record)
    shown = {**record, "interrupted_promotion": interrupted} if interrupted else record
    print(json.dumps(shown, indent=2) if args.json else models_text(record))
    if unreachable:
        print(f"warning: {unreachable}; shown above: this machine's copy of the record", file=sys.stderr)
    if interrupted is None:
        return EXIT_OK
    print(f"error: {interrupted['message']}", file=sys.stderr)
    # Under way: the project is busy (3). Interrupted: production cannot be trusted until someone finishes it, a
    # check that says no (1), as evaluate says for the same state; nothing the user typed was wrong (not 2).
    return EXIT_BUSY if interrupted["running"] else EXIT_CHECK_FAILED


def command_promote(args: argparse.Namespace, project: Path) -> int:
    from tasks.config import load_params
    from tasks.errors import RegraftError
    from tasks.promotion import canary_model, end_canary, end_shadow, promote_model, rollback, shadow_model
    from tasks.render import shadow_change_text

    params = load_params(project / "params.yaml")
    if args.command == "rollback":
        record = rollback(params, args.reason, args.by)
    elif args.shadow_off:
        record = end_shadow(params, args.tag, args.reason or "shadow ended by hand", args.by)
    elif args.canary_off:
        record = end_canary(params, args.tag, args.reason or "canary ended by hand", args.by)
    elif not args.tag:
        raise RegraftError("regraft promote: name the model TAG (or end the shadow or canary with --shadow-off, "
                           "--canary-off)")
    elif args.shadow:
        record = shadow_model(params, args.tag, args.reason or "shadow started by hand", args.by)
    elif args.canary is not None:
        record = canary_model(params, args.tag, args.canary, args.reason or "canary started by hand", args.by)
    else:
        record = promote_model(params, args.tag, args.reason or "promoted by hand", args.by)
    if record.get("finished"):
        print(record["finished"])
    *earlier, event = record["history"]
    if event["action"] in ("shadow", "shadow-off", "canary", "canary-off"):
        print(shadow_change_text(event))
        return EXIT_OK
    if earlier and earlier[-1]["action"] in ("shadow-off", "canary-off") and earlier[-1]["at"] == event["at"]:
        print(shadow_change_text(earlier[-1]))  # the promotion or rollback ended the shadow or canary
    print(f"{event['action']}: {event['tag']} is now in production"
          + (f" (was {event['previous']})" if event.get("previous") else "") + f"; {record['versioning']}")
    return EXIT_OK
