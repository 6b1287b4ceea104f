"""`zrproxy audit delete|export`: answer a customer's deletion and access requests.

Deleting needs no key (records are found by day and request id, which file names hold).
Exporting needs the customer's age identity, given by the customer for the occasion: the
plaintext goes to stdout only, never to a file of ours.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import pyrage

from zrproxy import auditfiles
from zrproxy.config import AuditConfig, load_config
from zrproxy.errors import ConfigError


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser("audit", help="delete or export a project's audit records")
    actions = audit.add_subparsers(dest="audit_command", required=True)
    delete = actions.add_parser("delete", help="delete audit records")
    export = actions.add_parser("export", help="decrypt audit records to JSON Lines on stdout")
    for sub in (delete, export):
        sub.add_argument("--config", required=True, help="the proxy's TOML config file")
        sub.add_argument("--project", required=True)
    which = delete.add_mutually_exclusive_group(required=True)
    which.add_argument("--before", help="records written on UTC days before DATE (YYYY-MM-DD)")
    which.add_argument("--request-id", help="the records of one request id")
    which.add_argument("--all", action="store_true", help="every record of the project")
    export.add_argument("--identity", required=True, help="age identity file (AGE-SECRET-KEY-1…)")


def main(args: argparse.Namespace) -> int:
    audit = _audit_config(args.config, args.project)
    if args.audit_command == "delete":
        return _delete(audit, args)
    return _export(audit, args.project, args.identity)


def _audit_config(path: str, project: str) -> AuditConfig:
    config = load_config(path)
    if config.audit is None:
        raise ConfigError("audit", "the config has no [audit] table")
    if project not in {p.name for p in config.projects}:
        raise ConfigError("--project", "no such project in the config")
    return config.audit


def _delete(audit: AuditConfig, args: argparse.Namespace) -> int:
    if args.request_id is not None:
        removed = auditfiles.delete_request(audit.dir, args.project, args.request_id)
    else:
        if args.all:
            before = datetime.date.max
        else:
            try:
                before = datetime.date.fromisoformat(args.before)
            except ValueError:
                raise ConfigError("--before", "must be a date, YYYY-MM-DD") from None
        removed = auditfiles.delete_before(audit.dir, args.project, before)
    sys.stdout.write(f"deleted {removed} audit records of project {args.project}\n")
    return 0


def _export(audit: AuditConfig, project: str, identity_file: str) -> int:
    try:
        identities = auditfiles.read_identities(identity_file)
    except (OSError, UnicodeDecodeError, pyrage.IdentityError):
        identities = []  # unreadable, or a malformed key line: the error text quotes it
    if not identities:
        sys.stderr.write("audit export: no usable AGE-SECRET-KEY-1 identity in --identity\n")
        return 2
    failed = 0
    out = sys.stdout.buffer
    for path in auditfiles.record_files(audit.dir, project):
        try:
            out.write(auditfiles.open_record(path, identities))
        except (pyrage.DecryptError, OSError):  # not for this key, damaged, or just deleted
            failed += 1
    out.flush()
    if failed:
        sys.stderr.write(f"audit export: {failed} records could not be decrypted\n")
        return 1
    return 0
