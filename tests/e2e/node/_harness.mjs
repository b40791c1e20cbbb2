// Shared plumbing for the nodemailer end-to-end scripts in this directory.
//
// Nothing here is part of PostStack's documented examples: it only reads the
// test's environment and turns nodemailer's result into ONE line of JSON on
// stdout, which tests/common/node.py parses.
//
// Environment (set by tests/common/node.py):
//   SMTP_HOST  host to connect to (required), e.g. 127.0.0.1
//   SMTP_PORT  port to connect to (required), e.g. 46123
//   SMTP_CA    path to a PEM file with the server's self-signed certificate
//              (required); trusted via tls.ca, with servername 'localhost'
//   SMTP_USER  optional; the scripts fall back to the page's 'poststack'
//   SMTP_PASS  optional; the scripts fall back to the page's 'sk_live_...'
//
// Output contract (always exactly one JSON line on stdout, exit status 0):
//   {"ok": true,  "response": "<final reply>", "messageId": "...",
//    "envelope": {...}, "accepted": [...], "rejected": [...], ...}
//   {"ok": false, "code": <SMTP reply code or null>, "response": "<reply or null>",
//    "error": "<error message>", "errorCode": "<nodemailer code or null>", ...}
// Exit status 2 (and a message on stderr) means the harness itself is broken:
// a missing variable, an unknown variant, an unexpected exception.

import fs from 'node:fs';

const started = Date.now();

/** Report a harness bug on stderr and exit with status 2. */
export function harnessBug(message) {
    process.stderr.write(`harness error: ${message}\n`);
    process.exit(2);
}

process.on('uncaughtException', (err) => harnessBug(err && err.stack ? err.stack : String(err)));
process.on('unhandledRejection', (err) => harnessBug(err && err.stack ? err.stack : String(err)));

function requireEnv(name) {
    const value = process.env[name];
    if (value === undefined || value === '') {
        harnessBug(`environment variable ${name} is required`);
    }
    return value;
}

/** SMTP_HOST, as given. */
export const SMTP_HOST = requireEnv('SMTP_HOST');

/** SMTP_PORT, as a number. */
export const SMTP_PORT = (() => {
    const raw = requireEnv('SMTP_PORT');
    const port = Number(raw);
    if (!Number.isInteger(port) || port < 1 || port > 65535) {
        harnessBug(`SMTP_PORT must be a TCP port number, got ${JSON.stringify(raw)}`);
    }
    return port;
})();

/** The contents of the PEM file named by SMTP_CA. */
export const SMTP_CA_PEM = (() => {
    const path = requireEnv('SMTP_CA');
    try {
        return fs.readFileSync(path);
    } catch (err) {
        return harnessBug(`cannot read SMTP_CA ${JSON.stringify(path)}: ${err.message}`);
    }
})();

/** The tls options that make nodemailer trust the test's self-signed certificate. */
export function testTls() {
    return { ca: [SMTP_CA_PEM], servername: 'localhost' };
}

function emit(record) {
    record.elapsedMs = Date.now() - started;
    process.stdout.write(JSON.stringify(record) + '\n');
}

/** Print the success line for nodemailer's sendMail() result. */
export function reportSuccess(info, extra = {}) {
    emit({
        ok: true,
        response: info.response ?? null,
        messageId: info.messageId ?? null,
        envelope: info.envelope ?? null,
        accepted: info.accepted ?? [],
        rejected: info.rejected ?? [],
        ...extra,
    });
}

/** Print the failure line for an error nodemailer raised. */
export function reportFailure(err, extra = {}) {
    if (!(err instanceof Error)) {
        harnessBug(`sendMail rejected with a non-Error: ${String(err)}`);
    }
    emit({
        ok: false,
        code: err.responseCode ?? null,
        response: err.response ?? null,
        error: err.message,
        errorCode: err.code ?? null,
        command: err.command ?? null,
        ...extra,
    });
}

/**
 * A JSON-friendly copy of a nodemailer message object: Buffers become
 * {"base64": "..."} so a test can compare what was sent with what arrived.
 */
export function describeMessage(message) {
    return JSON.parse(
        JSON.stringify(message, (key, value) => {
            if (value && value.type === 'Buffer' && Array.isArray(value.data)) {
                return { base64: Buffer.from(value.data).toString('base64') };
            }
            return value;
        }),
    );
}
