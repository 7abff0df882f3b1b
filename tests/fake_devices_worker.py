"""The subprocess of helpers.FakeDevices: for each request line [module, function, args] it answers one JSON
line, {"result": module.function(*args)} or {"error": traceback}. What the bodies print (a CLI's output) goes
to stderr, so that stdout carries the answers alone."""

import importlib
import json
import sys
import traceback

answers, sys.stdout = sys.stdout, sys.stderr
for line in sys.stdin:
    module, function, args = json.loads(line)
    try:
        answer = {"result": getattr(importlib.import_module(module), function)(*args)}
    except BaseException:  # noqa: BLE001 — a failed assertion or a CLI's SystemExit is the caller's failure
        answer = {"error": traceback.format_exc()}
    answers.write(json.dumps(answer) + "\n")
    answers.flush()
