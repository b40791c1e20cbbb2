#!/usr/bin/env node
/*
 * bench/loadgen.js - the SMTP load generator of `make bench` (docs/performance.md).
 *
 * Node 20, standard library only (tls, fs, readline). One process, event
 * driven: every connection is an async loop over one TLS socket, so a
 * single core drives thousands of messages per second.
 *
 * Each connection speaks implicit TLS (RFC 8314): TLS from the first byte,
 * then the 220 greeting, EHLO, AUTH PLAIN. Per message: MAIL FROM, RCPT TO
 * (one per --to), DATA, the message (CRLF, dot-stuffed) and the final ".".
 * With PIPELINING (default: used when the server advertises it) MAIL, RCPT
 * and DATA go out in one write. Latency is the time from writing the end
 * of data (the message and ".\r\n" go out in one write) to the final reply,
 * measured with process.hrtime.bigint(). A final reply other than 250 (or a
 * refused MAIL/RCPT/DATA) counts as failed; nothing is retried.
 *
 * Modes:
 *   --mode persistent  --connections N sessions are opened and authenticated
 *                      first; the clock starts when all are ready; the
 *                      messages are shared among them.
 *   --mode fresh       every message gets its own connection: TLS handshake,
 *                      greeting, EHLO, AUTH, the message, QUIT; N at once.
 *                      The clock includes the connection set-up.
 *   --idle LIST        (S3) before anything else, open authenticated idle
 *                      connections up to each cumulative target of LIST
 *                      (e.g. "1000,5000"). After each target: send --messages
 *                      messages over --connections other (persistent)
 *                      connections, print {"idle_ready": N, ...} and wait for
 *                      a line "go" on stdin (so that the caller can measure
 *                      the server while the connections sit idle). At the end
 *                      all connections are closed.
 *
 * Output: one JSON line on stdout at the end (and the idle_ready lines):
 *   {"sent","ok","failed","codes":{"250":..},"elapsed_s","msgs_per_s",
 *    "latency_ms":{"p50","p90","p99","max"},"errors":[first few], ...}
 * Exit status 0 when every message got 250, 1 otherwise, 2 on bad usage.
 * Never runs past --time-limit seconds.
 *
 * Example:
 *   node bench/loadgen.js --host 127.0.0.1 --port 8587 --ca cert.pem \
 *     --user poststack --password sk_test_bench --connections 10 \
 *     --messages 20000 --message-file msg.eml
 */
'use strict';

const fs = require('fs');
const readline = require('readline');
const tls = require('tls');

// ---------------------------------------------------------------- options

const DEFAULTS = {
  host: '127.0.0.1',
  port: 587,
  servername: 'localhost',
  ca: null,
  insecure: false,
  user: 'poststack',
  password: 'sk_test_bench',
  connections: 10,
  messages: 100,
  mode: 'persistent',
  'message-file': null,
  from: 'you@yourdomain.com',
  to: [],
  'time-limit': 120,
  'reply-timeout': 60,
  idle: '',
  'idle-concurrency': 50,
  pipelining: 'auto',
  ehlo: 'loadgen.localhost',
};
const FLAGS = new Set(['insecure']);
const NUMERIC = new Set(['port', 'connections', 'messages', 'time-limit', 'reply-timeout', 'idle-concurrency']);

function usage(message) {
  process.stderr.write(
    (message ? `loadgen: ${message}\n` : '') +
    'usage: node bench/loadgen.js --host H --port P (--ca FILE | --insecure) [--servername localhost]\n' +
    '  [--user U --password P] [--connections N] [--messages TOTAL] [--mode persistent|fresh]\n' +
    '  [--message-file PATH] [--from ADDR] [--to ADDR]... [--pipelining auto|yes|no]\n' +
    '  [--time-limit S] [--reply-timeout S] [--idle N[,N...]] [--idle-concurrency N]\n');
  process.exit(2);
}

function parseArgs(argv) {
  const opts = Object.assign({}, DEFAULTS, { to: [] });
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--help' || arg === '-h') usage();
    if (!arg.startsWith('--')) usage(`unexpected argument ${arg}`);
    let name = arg.slice(2);
    let value;
    const eq = name.indexOf('=');
    if (eq >= 0) { value = name.slice(eq + 1); name = name.slice(0, eq); }
    if (!(name in DEFAULTS)) usage(`unknown option --${name}`);
    if (FLAGS.has(name)) { opts[name] = true; continue; }
    if (value === undefined) {
      if (i + 1 >= argv.length) usage(`--${name} needs a value`);
      value = argv[++i];
    }
    if (name === 'to') opts.to.push(value);
    else if (NUMERIC.has(name)) {
      const n = Number(value);
      if (!Number.isFinite(n) || n < 0) usage(`--${name} must be a number >= 0`);
      opts[name] = n;
    } else opts[name] = value;
  }
  if (opts.to.length === 0) opts.to.push('user@example.com');
  if (!['persistent', 'fresh'].includes(opts.mode)) usage('--mode is persistent or fresh');
  if (!['auto', 'yes', 'no'].includes(opts.pipelining)) usage('--pipelining is auto, yes or no');
  if (!opts.ca && !opts.insecure) usage('give --ca FILE or --insecure');
  if (opts.connections < 1) usage('--connections must be >= 1');
  opts.idleTargets = opts.idle === '' ? [] : String(opts.idle).split(',').map(Number);
  for (let k = 0; k < opts.idleTargets.length; k++) {
    const t = opts.idleTargets[k];
    if (!Number.isInteger(t) || t < 0 || (k > 0 && t < opts.idleTargets[k - 1])) {
      usage('--idle is a rising list of connection counts, e.g. 1000,5000');
    }
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));

/** The message as it goes on the wire after DATA: CRLF, dot-stuffed, ".\r\n". */
function wireMessage(path) {
  let text;
  if (path) text = fs.readFileSync(path).toString('latin1');
  else {
    text = 'From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: loadgen\r\n' +
      'Message-ID: <loadgen@yourdomain.com>\r\n\r\nHello from bench/loadgen.js.\r\n';
  }
  text = text.replace(/\r?\n/g, '\r\n').replace(/^\./gm, '..');
  if (!text.endsWith('\r\n')) text += '\r\n';
  return Buffer.from(text + '.\r\n', 'latin1');
}

const MESSAGE = wireMessage(opts['message-file']);
const CA = opts.ca ? fs.readFileSync(opts.ca) : undefined;
// One TLS context for every connection: tls.connect({ca}) would build a new
// one (and load the CA certificate again) per connection, which costs the
// generator more CPU per fresh connection (S2) than the handshake itself.
const SECURE_CONTEXT = tls.createSecureContext({ ca: CA });
const MAIL_CMD = `MAIL FROM:<${opts.from}>\r\n`;
const RCPT_CMDS = opts.to.map((a) => `RCPT TO:<${a}>\r\n`);
const ENVELOPE_PIPELINED = MAIL_CMD + RCPT_CMDS.join('') + 'DATA\r\n';
const AUTH_CMD = 'AUTH PLAIN ' +
  Buffer.from(`\0${opts.user}\0${opts.password}`, 'utf8').toString('base64') + '\r\n';
const MAX_ERRORS_KEPT = 10;

// ---------------------------------------------------------------- results

const stats = {
  requested: 0,        // messages this run was asked to send
  sent: 0,             // transactions started
  ok: 0,
  failed: 0,
  codes: Object.create(null),
  errors: [],
  errorCount: 0,
  latencies: new Float64Array(Math.max(16, opts.messages * Math.max(1, opts.idleTargets.length))),
  nLat: 0,
  pipeliningAdvertised: null,
  pipeliningUsed: null,
  connectionsOpened: 0,
  connectFailures: 0,
  idleStages: [],
  timedOut: false,
};

function noteError(text) {
  stats.errorCount++;
  if (stats.errors.length < MAX_ERRORS_KEPT) stats.errors.push(String(text).slice(0, 300));
}

function noteCode(code) {
  const key = String(code);
  stats.codes[key] = (stats.codes[key] || 0) + 1;
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank];
}

const round3 = (x) => (x === null ? null : Math.round(x * 1000) / 1000);

let clockStart = null;   // hrtime bigint when the measured part began
let clockEnd = null;
let finished = false;

/** Print the one result line and exit (only once). */
function finish() {
  if (finished) return;
  finished = true;
  const end = clockEnd || process.hrtime.bigint();
  const elapsed = clockStart === null ? 0 : Number(end - clockStart) / 1e9;
  const lat = stats.latencies.subarray(0, stats.nLat).slice().sort();
  const result = {
    sent: stats.sent,
    ok: stats.ok,
    failed: stats.failed,
    requested: stats.requested,
    codes: stats.codes,
    elapsed_s: round3(elapsed),
    msgs_per_s: elapsed > 0 ? round3(stats.ok / elapsed) : null,
    latency_ms: {
      p50: round3(percentile(lat, 50)),
      p90: round3(percentile(lat, 90)),
      p99: round3(percentile(lat, 99)),
      max: round3(lat.length ? lat[lat.length - 1] : null),
    },
    errors: stats.errors,
    error_count: stats.errorCount,
    mode: opts.mode,
    connections: opts.connections,
    connections_opened: stats.connectionsOpened,
    connect_failures: stats.connectFailures,
    pipelining_advertised: stats.pipeliningAdvertised,
    pipelining_used: stats.pipeliningUsed,
    message_bytes: MESSAGE.length,
    timed_out: stats.timedOut,
  };
  if (opts.idleTargets.length) result.idle = stats.idleStages;
  const allOk = !stats.timedOut && stats.ok === stats.requested && stats.failed === 0 && stats.errorCount === 0;
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(allOk ? 0 : 1));
}

// ---------------------------------------------------------------- one SMTP connection

const liveSockets = new Set();

/**
 * An SMTP client connection over implicit TLS with a reply queue: replies
 * that arrive before anybody waits for them (pipelining) are kept in order.
 */
class SmtpConnection {
  constructor() {
    this.buffer = '';
    this.lines = [];          // lines of the reply being read
    this.replies = [];        // complete replies nobody asked for yet
    this.waiters = [];        // {resolve, reject} waiting for a reply
    this.error = null;
    this.socket = null;
  }

  /** Connect and complete the TLS handshake. */
  connect() {
    return new Promise((resolve, reject) => {
      const socket = tls.connect({
        host: opts.host,
        port: opts.port,
        servername: opts.servername,
        secureContext: SECURE_CONTEXT,
        rejectUnauthorized: !opts.insecure,
      });
      this.socket = socket;
      liveSockets.add(socket);
      socket.setEncoding('latin1');
      socket.setNoDelay(true);
      socket.setTimeout(opts['reply-timeout'] * 1000, () => {
        socket.destroy(new Error(`no reply within ${opts['reply-timeout']} s`));
      });
      let connected = false;
      socket.once('secureConnect', () => { connected = true; resolve(); });
      socket.on('data', (chunk) => this.onData(chunk));
      socket.on('error', (err) => { this.fail(err); if (!connected) reject(err); });
      socket.on('close', () => {
        liveSockets.delete(socket);
        const err = this.error || new Error('connection closed by the server');
        this.fail(err);
        if (!connected) reject(err);
      });
    });
  }

  onData(chunk) {
    this.buffer += chunk;
    let start = 0;
    let nl;
    while ((nl = this.buffer.indexOf('\n', start)) >= 0) {
      const line = this.buffer.slice(start, nl).replace(/\r$/, '');
      start = nl + 1;
      this.lines.push(line);
      if (line.length < 4 || line[3] !== '-') {   // the last line of a reply
        const reply = { code: parseInt(line.slice(0, 3), 10) || 0, lines: this.lines };
        this.lines = [];
        const waiter = this.waiters.shift();
        if (waiter) waiter.resolve(reply);
        else this.replies.push(reply);
      }
    }
    this.buffer = this.buffer.slice(start);
  }

  fail(err) {
    if (!this.error) this.error = err;
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w.reject(this.error);
  }

  /** The next reply ({code, lines}); rejects when the connection fails. */
  reply() {
    if (this.replies.length) return Promise.resolve(this.replies.shift());
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  write(data) {
    if (this.error) throw this.error;
    this.socket.write(data);
  }

  async command(line) {
    this.write(line);
    return this.reply();
  }

  /** Stop the inactivity timer (for connections meant to sit idle). */
  idle() { this.socket.setTimeout(0); }

  close() {
    if (this.socket && !this.socket.destroyed) this.socket.destroy();
  }

  /** QUIT politely (bounded by the reply timeout), then close. */
  async quit() {
    try { await this.command('QUIT\r\n'); } catch (_) { /* closing anyway */ }
    if (this.socket && !this.socket.destroyed) this.socket.end();
  }
}

const describe = (reply) => reply.lines.join(' | ').slice(0, 200);

/** A connection that is connected, greeted, EHLO'd and authenticated. */
async function openSession() {
  const c = new SmtpConnection();
  try {
    await c.connect();
    stats.connectionsOpened++;
    const greeting = await c.reply();
    if (greeting.code !== 220) throw new Error(`greeting: ${describe(greeting)}`);
    const ehlo = await c.command(`EHLO ${opts.ehlo}\r\n`);
    if (ehlo.code !== 250) throw new Error(`EHLO: ${describe(ehlo)}`);
    const caps = ehlo.lines.slice(1).map((l) => l.slice(4).trim().toUpperCase());
    const advertised = caps.includes('PIPELINING');
    if (stats.pipeliningAdvertised === null) stats.pipeliningAdvertised = advertised;
    c.pipelining = opts.pipelining === 'yes' || (opts.pipelining === 'auto' && advertised);
    if (stats.pipeliningUsed === null) stats.pipeliningUsed = c.pipelining;
    const auth = await c.command(AUTH_CMD);
    if (auth.code !== 235) throw new Error(`AUTH: ${describe(auth)}`);
    return c;
  } catch (err) {
    c.close();
    throw err;
  }
}

/** Count one message that could not even start (no session). */
function messageLost(err) {
  stats.sent++;
  stats.failed++;
  noteCode('conn');
  noteError(err.message || err);
}

/**
 * One mail transaction on an authenticated session. Resolves when the
 * message is accounted for; rejects only if the connection broke (the
 * message is then counted as failed already).
 */
async function transaction(c) {
  stats.sent++;
  let counted = false;
  try {
    const envelope = [];
    if (c.pipelining) {
      c.write(ENVELOPE_PIPELINED);
      for (let k = 0; k < RCPT_CMDS.length + 2; k++) envelope.push(await c.reply());
    } else {
      envelope.push(await c.command(MAIL_CMD));
      if (envelope[0].code === 250) {
        for (const rcpt of RCPT_CMDS) {
          const r = await c.command(rcpt);
          envelope.push(r);
          if (r.code !== 250 && r.code !== 251) break;
        }
      }
      const last = envelope[envelope.length - 1];
      if (last.code === 250 || last.code === 251) envelope.push(await c.command('DATA\r\n'));
    }
    const data = envelope[envelope.length - 1];
    const refused = envelope.slice(0, -1).find((r) => r.code !== 250 && r.code !== 251);
    if (data.code !== 354) {
      const bad = refused || data;
      stats.failed++;
      counted = true;
      noteCode(bad.code);
      noteError(`refused: ${describe(bad)}`);
      await c.command('RSET\r\n');
      return;
    }
    const t0 = process.hrtime.bigint();
    c.write(MESSAGE);
    const final = await c.reply();
    const ms = Number(process.hrtime.bigint() - t0) / 1e6;
    if (stats.nLat < stats.latencies.length) stats.latencies[stats.nLat++] = ms;
    if (final.code === 250 && !refused) {
      stats.ok++;
      noteCode(250);
    } else {
      stats.failed++;
      noteCode(refused ? refused.code : final.code);
      noteError(`end of data: ${describe(refused || final)}`);
    }
  } catch (err) {
    if (!counted) {
      stats.failed++;
      noteCode('conn');
    }
    noteError(err.message || err);
    throw err;
  }
}

// ---------------------------------------------------------------- workloads

/** Shared message counter: claim() is true while messages are left. */
function makeCounter(total) {
  let left = total;
  return { claim: () => (!finished && left > 0 ? (left--, true) : false), left: () => left };
}

/**
 * --connections sessions, opened first, then share `total` messages.
 * A broken session is reopened (at most 3 times in a row per worker).
 */
async function runPersistent(total, startClock) {
  const counter = makeCounter(total);
  const sessions = await Promise.all(
    Array.from({ length: opts.connections }, () => openSession().catch((err) => {
      stats.connectFailures++;
      noteError(`connect: ${err.message || err}`);
      return null;
    })));
  if (startClock) clockStart = process.hrtime.bigint();
  await Promise.all(sessions.map(async (session) => {
    let c = session;
    let failuresInARow = c ? 0 : 1;
    while (counter.claim()) {
      if (!c) {
        if (failuresInARow > 3) { messageLost(new Error('gave up reconnecting')); continue; }
        try {
          c = await openSession();
        } catch (err) {
          stats.connectFailures++;
          failuresInARow++;
          messageLost(err);
          continue;
        }
      }
      try {
        await transaction(c);
        failuresInARow = 0;
      } catch (_) {
        c.close();
        c = null;
        failuresInARow++;
      }
    }
    if (c) await c.quit();
  }));
}

/** A new connection (TLS + EHLO + AUTH) per message, --connections at once. */
async function runFresh(total) {
  const counter = makeCounter(total);
  clockStart = process.hrtime.bigint();
  await Promise.all(Array.from({ length: opts.connections }, async () => {
    while (counter.claim()) {
      let c;
      try {
        c = await openSession();
      } catch (err) {
        stats.connectFailures++;
        messageLost(err);
        continue;
      }
      try {
        await transaction(c);
        await c.quit();
      } catch (_) {
        c.close();
      }
    }
  }));
}

/** Wait for a line "go" on stdin (bounded by the time limit). */
let stdinLines = null;
function waitForGo() {
  if (!stdinLines) {
    stdinLines = { queue: [], waiter: null, closed: false };
    const rl = readline.createInterface({ input: process.stdin });
    rl.on('line', (line) => {
      if (line.trim() !== 'go') return;
      if (stdinLines.waiter) { const w = stdinLines.waiter; stdinLines.waiter = null; w(); }
      else stdinLines.queue.push(line);
    });
    rl.on('close', () => {
      stdinLines.closed = true;
      if (stdinLines.waiter) { const w = stdinLines.waiter; stdinLines.waiter = null; w(); }
    });
  }
  if (stdinLines.queue.length || stdinLines.closed) { stdinLines.queue.shift(); return Promise.resolve(); }
  return new Promise((resolve) => { stdinLines.waiter = resolve; });
}

/** S3: idle connections in stages, messages at each stage, hold until "go". */
async function runIdle() {
  const idle = [];
  clockStart = process.hrtime.bigint();
  for (const target of opts.idleTargets) {
    const t0 = process.hrtime.bigint();
    let failed = 0;
    let next = idle.length;
    const workers = Array.from({ length: Math.max(1, opts['idle-concurrency']) }, async () => {
      while (!finished && next < target) {
        next++;
        try {
          const c = await openSession();
          c.idle();
          idle.push(c);
        } catch (err) {
          failed++;
          stats.connectFailures++;
          noteError(`idle connect: ${err.message || err}`);
        }
      }
    });
    await Promise.all(workers);
    const openS = Number(process.hrtime.bigint() - t0) / 1e9;
    const okBefore = stats.ok;
    await runPersistent(opts.messages, false);
    const alive = idle.filter((c) => !c.error).length;
    const stage = {
      target, open: alive, failed, open_s: round3(openS),
      messages: opts.messages, messages_ok: stats.ok - okBefore,
    };
    stats.idleStages.push(stage);
    process.stdout.write(JSON.stringify(Object.assign({ idle_ready: alive }, stage)) + '\n');
    await waitForGo();
    if (finished) return;
  }
  clockEnd = process.hrtime.bigint();
  for (const c of idle) c.close();
}

// ---------------------------------------------------------------- main

const limitTimer = setTimeout(() => {
  stats.timedOut = true;
  noteError(`time limit of ${opts['time-limit']} s reached`);
  for (const s of liveSockets) s.destroy();
  setTimeout(finish, 100);
}, opts['time-limit'] * 1000);

async function main() {
  if (opts.idleTargets.length) {
    stats.requested = opts.messages * opts.idleTargets.length;
    await runIdle();
  } else if (opts.mode === 'fresh') {
    stats.requested = opts.messages;
    await runFresh(opts.messages);
  } else {
    stats.requested = opts.messages;
    await runPersistent(opts.messages, true);
  }
  if (!clockEnd) clockEnd = process.hrtime.bigint();
  clearTimeout(limitTimer);
  for (const s of liveSockets) s.destroy();
  finish();
}

main().catch((err) => {
  noteError(`internal: ${err && err.stack ? err.stack : err}`);
  finish();
});
