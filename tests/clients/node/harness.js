// What the ccat-api tests share: the straycat binary on a port of 127.0.0.1, the real
// `CatClient` of ccat-api wired to handlers that record what it gets, bounded waits, and a
// probe for the Cheshire Cat HTTP endpoints (so their tests can skip until the server has
// them). Every wait is for a condition under a deadline; nothing sleeps hoping.
'use strict';

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const { CatClient } = require('ccat-api');

const ROOT = path.resolve(__dirname, '..', '..', '..');
const START_TIMEOUT_MS = 20000;
const STOP_TIMEOUT_MS = 10000;
// The most any single wait in these tests may take before it fails.
const WAIT_MS = 15000;

function binary() {
  if (process.env.STRAYCAT_BIN) return process.env.STRAYCAT_BIN;
  let target = process.env.CARGO_TARGET_DIR || path.join(ROOT, 'target');
  if (!path.isAbsolute(target)) target = path.join(ROOT, target);
  const bin = path.join(target, 'release', 'straycat');
  if (!fs.existsSync(bin)) throw new Error(`${bin} is missing: run \`cargo build --release\` first`);
  return bin;
}

// Resolves with what `probe()` returns once it is truthy, looking again whenever the owner's
// events call its `waiters`; rejects (naming `what` and `describe()`) after `ms`.
function waitUntil(probe, what, { ms = WAIT_MS, owner, describe = () => '' } = {}) {
  return new Promise((resolve, reject) => {
    const check = () => {
      let got;
      try {
        got = probe();
      } catch (e) {
        done();
        reject(e);
        return;
      }
      if (got) {
        done();
        resolve(got);
      }
    };
    const timer = setTimeout(() => {
      done();
      reject(new Error(`no ${what} within ${ms} ms${describe() ? `; ${describe()}` : ''}`));
    }, ms);
    const done = () => {
      clearTimeout(timer);
      owner.waiters.delete(check);
    };
    owner.waiters.add(check);
    check();
  });
}

// A promise (a ccat-api CancelablePromise: its HTTP calls have no timeout of their own)
// that must settle within `ms`; past that it is cancelled and the test fails.
function within(promise, what, ms = WAIT_MS) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => {
      if (typeof promise.cancel === 'function') promise.cancel();
      reject(new Error(`${what}: no answer within ${ms} ms`));
    }, ms);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

// Every straycat still running when this process ends is killed, so that none outlives a
// run that failed or was stopped (SIGKILL, which needs nothing of the server, not even a
// log pipe that is still open). A SIGTERM or SIGINT to this process ends it that way too.
const running = new Set();
process.on('exit', () => {
  for (const proc of running) proc.kill('SIGKILL');
});
for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP']) {
  process.on(sig, () => process.exit(128 + (sig === 'SIGINT' ? 2 : sig === 'SIGHUP' ? 1 : 15)));
}

class Server {
  // A straycat process on 127.0.0.1: port 0 the first time (read back from its log), the
  // same port after a restart.
  constructor(args = []) {
    this.args = args;
    this.port = 0;
    this.lines = [];
    this.waiters = new Set();
    this.proc = null;
  }

  async start() {
    const mark = this.lines.length;
    const proc = spawn(
      binary(),
      ['--listen', `127.0.0.1:${this.port}`, '--log-level', 'debug', ...this.args],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    this.proc = proc;
    running.add(proc);
    this.exited = new Promise((resolve) =>
      proc.on('exit', (code, signal) => {
        running.delete(proc);
        resolve({ code, signal });
      }),
    );
    let rest = '';
    proc.stderr.setEncoding('utf8');
    proc.stderr.on('data', (chunk) => {
      const parts = (rest + chunk).split('\n');
      rest = parts.pop();
      this.lines.push(...parts);
      for (const w of [...this.waiters]) w();
    });
    proc.on('exit', () => {
      for (const w of [...this.waiters]) w();
    });
    const line = await this.waitLog((l) => l.includes('listening on 127.0.0.1:'), { since: mark, ms: START_TIMEOUT_MS });
    this.port = Number(line.slice(line.lastIndexOf(':') + 1));
    return this;
  }

  mark() {
    return this.lines.length;
  }

  waitLog(pred, { since = 0, ms = WAIT_MS } = {}) {
    return waitUntil(
      () => {
        const found = this.lines.slice(since).find(pred);
        if (!found && this.proc.exitCode !== null) throw new Error(`straycat exited; log:\n${this.log()}`);
        return found;
      },
      'such straycat log line',
      { ms, owner: this, describe: () => `log:\n${this.log()}` },
    );
  }

  log() {
    return this.lines.slice(-80).join('\n');
  }

  // SIGTERM: straycat closes every socket with 1001 and exits 0.
  async stop() {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.kill('SIGTERM');
    let timer;
    const outcome = await Promise.race([
      this.exited,
      new Promise((resolve) => {
        timer = setTimeout(() => resolve(null), STOP_TIMEOUT_MS);
      }),
    ]);
    clearTimeout(timer);
    if (outcome === null) {
      this.proc.kill('SIGKILL');
      throw new Error(`straycat did not stop within ${STOP_TIMEOUT_MS} ms of SIGTERM`);
    }
    if (outcome.code !== 0) throw new Error(`straycat exited with ${JSON.stringify(outcome)}`);
  }
}

class Client {
  // One official ccat-api `CatClient` (it connects at once), its handlers recording every
  // message (`frames`), every error handed to onError (`errors`: the Cat's `error` frames
  // and the client's own SocketError/SocketClosed), and opens, closes and a FailedRetry.
  constructor(port, userId, { credential, delay = 3000, retries = 3 } = {}) {
    this.userId = userId;
    this.frames = [];
    this.errors = [];
    this.opens = 0;
    this.closes = 0;
    this.failed = null;
    this.waiters = new Set();
    const wake = () => {
      for (const w of [...this.waiters]) w();
    };
    this.cat = new CatClient({
      host: '127.0.0.1',
      port,
      userId,
      credential,
      ws: {
        delay,
        retries,
        onFailed: (err) => {
          this.failed = err;
          wake();
        },
      },
    });
    this.cat
      .onConnected(() => {
        this.opens += 1;
        wake();
      })
      .onDisconnected(() => {
        this.closes += 1;
        wake();
      })
      .onMessage((msg) => {
        this.frames.push(msg);
        wake();
      })
      .onError((err) => {
        this.errors.push(err);
        wake();
      });
  }

  describe() {
    return `${this.userId}: opens ${this.opens}, closes ${this.closes}, frames ${JSON.stringify(this.frames)}, errors ${JSON.stringify(this.errors)}`;
  }

  wait(probe, what, ms = WAIT_MS) {
    return waitUntil(probe, what, { ms, owner: this, describe: () => this.describe() });
  }

  waitOpen(n = 1) {
    return this.wait(() => this.opens >= n, `open #${n}`);
  }

  waitClosed(n = 1) {
    return this.wait(() => this.closes >= n, `close #${n}`);
  }

  waitFrame(pred, what, start = 0) {
    return this.wait(() => this.frames.slice(start).find(pred), what);
  }

  waitChat(start = 0) {
    return this.waitFrame((f) => f.type === 'chat', 'chat', start);
  }

  // CatClient.close(), and no reconnection after it: ccat-api's close() does not cancel a
  // reconnection it has already scheduled (its setTimeout then opens a new socket), so the
  // harness also turns that one into nothing.
  close() {
    this.cat.initWebSocket = () => {};
    this.cat.close();
  }
}

// The status of one raw HTTP request (to find out whether an endpoint exists).
function httpStatus(port, method, urlPath, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: urlPath, headers, timeout: WAIT_MS }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode));
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${urlPath}: no answer within ${WAIT_MS} ms`)));
    req.on('error', reject);
    req.end();
  });
}

// Whether straycat serves Cheshire Cat's `GET /memory/conversation_history` (404 while it
// does not: no side effect, so it is the probe).
async function hasChatApi(port, headers) {
  const status = await httpStatus(port, 'GET', '/memory/conversation_history', headers);
  return status !== 404 && status !== 405;
}

module.exports = { Client, Server, WAIT_MS, hasChatApi, httpStatus, within };
