// A real wsbus gateway for the tests: `python -m wsbus_cli serve` as a child process, on
// 127.0.0.1 (an ephemeral port unless given), with the demo's echo and chat services on the
// memory bus. Ended by its own pid. No tests of its own (node --test loads it as a file of
// test/ and finds none).
//
// The Python: $WSBUS_PYTHON, else the repository's .venv/bin/python when there is one, else
// python3; it must have wsbus installed with the websockets extra (pip install -e '.[dev]').

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
/** The root of the wsbus repository (the package is wsbus_websockets/js in it). */
export const ROOT = path.resolve(HERE, "..", "..", "..");
const READY = /listening on (ws:\/\/\S+)/;
// `python -m wsbus_cli`, which also stops the gateway when this process goes however it goes
// (a crash, a kill, a closed pipe: no exit handler runs then): it watches its stdin, a pipe
// from here, and at its end stops itself as Ctrl-C would.
const WATCHDOG = `
import os, runpy, signal, sys, threading

def watch():
    sys.stdin.buffer.read()
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=watch, daemon=True).start()
sys.argv[0] = "wsbus"
runpy.run_module("wsbus_cli", run_name="__main__", alter_sys=True)
`;

/** The Python that runs the gateway. */
export function python() {
  const given = process.env.WSBUS_PYTHON;
  // A path is taken from where the tests were started (`npm test` in this folder), not
  // from the repository root the gateway runs in: ../../.venv/bin/python works as written.
  if (given) return given.includes(path.sep) ? path.resolve(given) : given;
  const venv = path.join(ROOT, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

// Every gateway still running when the test process exits is killed (a failed test must not
// leave one behind); each by its own pid.
const running = new Set();
process.on("exit", () => {
  for (const child of running) {
    try {
      process.kill(child.pid, "SIGKILL");
    } catch {
      // gone already
    }
  }
});

/** Resolve with what `promise` gives, or reject after `ms` milliseconds saying `what`. */
export function within(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Start a gateway; resolves with {url, port, pid, stop()} once it listens.
 *
 * @param {object} [options]
 * @param {number} [options.port=0]  0: a free port
 * @param {string[]} [options.args]  more `wsbus serve` arguments
 * @param {object} [options.env]  more environment variables (WSBUS_TOKENS...)
 * @param {number} [options.timeout=60000]  ms to wait for it to listen
 */
export async function startGateway({ port = 0, args = [], env = {}, timeout = 60000 } = {}) {
  const command = [
    "-c",
    WATCHDOG,
    "serve",
    "--bus",
    "memory",
    "--host",
    "127.0.0.1",
    "--port",
    String(port),
    "--service",
    "wsbus_cli.demo_services:Echo",
    "--service",
    "wsbus_cli.demo_services:Chat",
    ...args,
  ];
  const child = spawn(python(), command, {
    cwd: ROOT,
    env: { ...process.env, ...env },
    stdio: ["pipe", "pipe", "pipe"],
  });
  running.add(child);
  const exited = new Promise((resolve) => {
    child.once("exit", (code, signal) => {
      running.delete(child);
      resolve(code ?? signal);
    });
    // A Python that cannot be started emits "error" and never "exit".
    child.once("error", (err) => {
      running.delete(child);
      resolve(err.code ?? "error");
    });
  });
  let errors = "";
  child.stderr.setEncoding("utf8");
  child.stderr.on("data", (text) => {
    errors = (errors + text).slice(-4000);
  });
  const listening = new Promise((resolve, reject) => {
    child.once("error", (err) => reject(new Error(`cannot start ${python()}: ${err.message}`)));
    const lines = createInterface({ input: child.stdout });
    lines.on("line", (line) => {
      const match = READY.exec(line);
      if (match) resolve(match[1]);
    });
    exited.then((code) => reject(new Error(`the gateway ended (${code}) before listening:\n${errors}`)));
  });
  let url;
  try {
    url = await within(listening, timeout, `${python()} -m wsbus_cli serve`);
  } catch (err) {
    child.kill("SIGKILL");
    await exited;
    throw new Error(
      `${err.message}\n(the gateway runs as $WSBUS_PYTHON -m wsbus_cli serve: set WSBUS_PYTHON ` +
        "to a Python with wsbus installed, e.g. ../../.venv/bin/python)",
    );
  }
  return {
    url,
    port: Number(new URL(url).port),
    pid: child.pid,
    /** Stop it as Ctrl-C would (its clients get 1001), and wait; killed after 20 s. */
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      process.kill(child.pid, "SIGTERM");
      try {
        await within(exited, 20000, "the gateway's exit after SIGTERM");
      } catch {
        process.kill(child.pid, "SIGKILL");
        await exited;
      }
    },
  };
}
