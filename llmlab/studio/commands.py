"""`llmlab studio`: serve the studio for a workspace, or manage its accounts.

    llmlab studio --workspace DIR [--host 127.0.0.1] [--port 7860] [--devices cpu]
    llmlab studio user add NAME --role viewer|editor|admin [--workspace DIR]
    llmlab studio user passwd NAME | role NAME ROLE | remove NAME | list  [--workspace DIR]

A password is read from the terminal (twice), or as the first line of standard input when it is not
a terminal (`... user add ann --role admin < password.txt`).
"""

from __future__ import annotations

import argparse
import getpass
import sys

from llmlab.common import LlmlabError
from llmlab.studio.store import ROLES, Store, StudioError

WORKSPACE_HELP = "the workspace folder (made when missing): runs, data, configs and the registry"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", default=".", help=WORKSPACE_HELP + " (default: the current folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the studio to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--devices", default="auto",
                   help="devices jobs run on, one job each at a time: 'cpu', or a comma list such as cuda:0,cuda:1 "
                        "(default: every GPU, else cpu)")
    p.add_argument("--max-upload-mb", type=float, default=512, help="largest file the Data page accepts")
    p.add_argument("--secure-cookies", action="store_true",
                   help="mark session cookies Secure (behind an HTTPS proxy)")
    users = p.add_subparsers(dest="studio_command", metavar="COMMAND")
    user = users.add_parser("user", help="manage the accounts of a workspace").add_subparsers(
        dest="user_command", metavar="ACTION", required=True)
    a = user.add_parser("add", help="make an account")
    a.add_argument("name")
    a.add_argument("--role", required=True, choices=ROLES, help="viewer: look and comment; editor: also launch, "
                   "stop and delete; admin: everything")
    for name, help_text in (("passwd", "set an account's password (logs its sessions out)"),
                            ("remove", "delete an account"), ("role", "change an account's role")):
        c = user.add_parser(name, help=help_text)
        c.add_argument("name")
        if name == "role":
            c.add_argument("role", choices=ROLES)
    user.add_parser("list", help="list the accounts")
    for c in user.choices.values():
        c.add_argument("--workspace", default=".", help=WORKSPACE_HELP + " (default: the current folder)")


def run(ns: argparse.Namespace) -> None:
    if ns.studio_command == "user":
        return _user(ns)
    from llmlab.serve.commands import check_address

    check_address(ns.host, ns.port)  # a port out of range, or held by another server, before anything is made
    if not 0 < ns.max_upload_mb <= 2**20:
        raise LlmlabError(f"--max-upload-mb {ns.max_upload_mb}: expected a size in (0, 1048576] MB")
    if not ns.workspace.strip():
        raise LlmlabError("--workspace: expected a folder")
    devices = _devices(ns.devices)
    from llmlab.studio.app import create_app, plotly_js

    plotly_js()  # the extras are there before anything is made
    store = Store.open(ns.workspace, create=True)
    try:
        if not store.users():
            raise StudioError(f"{ns.workspace}: no accounts yet; make an admin first: llmlab studio user add NAME "
                              f"--role admin --workspace {ns.workspace}")
    finally:
        store.close()
    import uvicorn

    from llmlab.studio.web import Studio

    studio = Studio(ns.workspace, devices=devices, max_upload_bytes=int(ns.max_upload_mb * 2**20),
                    secure_cookies=ns.secure_cookies)
    studio.queue.start()  # the workspace's lock: a second studio stops here, with its reason
    app = create_app(studio)
    print(f"llmlab studio for {studio.workspace} on http://{ns.host}:{ns.port} (jobs on {', '.join(devices)})",
          flush=True)
    if ns.host not in ("127.0.0.1", "localhost", "::1") and not ns.secure_cookies:
        print("note: reachable from the network without HTTPS; put it behind a TLS proxy and pass --secure-cookies",
              file=sys.stderr)
    uvicorn.run(app, host=ns.host, port=ns.port, log_level="warning")


def _devices(spec: str) -> tuple[str, ...]:
    if spec == "auto":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return tuple(f"cuda:{i}" for i in range(n)) or ("cpu",)
    devices = tuple(d.strip() for d in spec.split(",") if d.strip())
    bad = [d for d in devices if d != "cpu" and not (d.startswith("cuda:") and d[5:].isascii() and d[5:].isdigit())]
    if not devices or bad or len(set(devices)) != len(devices):
        raise LlmlabError(f"--devices {spec!r}: expected 'cpu' or distinct cuda:N, comma-separated")
    gpus = [int(d[5:]) for d in devices if d != "cpu"]
    if gpus:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if max(gpus) >= count:
            raise LlmlabError(f"--devices {spec!r}: this machine has {count} GPU{'s' * (count != 1)}")
    return devices


def _user(ns: argparse.Namespace) -> None:
    if not ns.workspace.strip():
        raise LlmlabError("--workspace: expected a folder")
    store = Store.open(ns.workspace, create=ns.user_command == "add")
    try:
        if ns.user_command == "list":
            for user in store.users():
                print(f"{user['name']}\t{user['role']}")
        elif ns.user_command == "add":
            store.add_user(ns.name, _password(), ns.role)
            print(f"added {ns.role} {ns.name} to {store.workspace}")
        elif ns.user_command == "passwd":
            store.set_password(ns.name, _password())
            print(f"set the password of {ns.name}")
        elif ns.user_command == "role":
            store.set_role(ns.name, ns.role)
            print(f"{ns.name} is now {ns.role}")
        elif ns.user_command == "remove":
            store.remove_user(ns.name)
            print(f"removed {ns.name}")
    finally:
        store.close()


def _password() -> str:
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line.strip():
            raise StudioError("no password on standard input (its first line)")
        return line.rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise StudioError("the two passwords differ")
    return first
