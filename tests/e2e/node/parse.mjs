// Parse one message with nodemailer's mailparser and print what it sees.
//
// The independent second opinion for the relay's MIME translation
// (tests/e2e/test_mime_crosscheck.py compares it with translate()).
//
// Usage: node parse.mjs <path to an .eml file>
//
// Output: exactly one JSON line on stdout, exit status 0:
//   {"ok": true, "subject": "..." | null,
//    "from": [{"name", "address"}], "to": [...], "cc": [...],
//    "text": "..." | null, "html": "..." | null,
//    "hasText": bool, "hasHtml": bool,
//    "attachments": [{"filename", "contentType", "declaredType",
//                     "contentDisposition", "cid", "related", "size", "sha256"}],
//    "tags": ["<each X-PostStack-Tags value>", ...],
//    "messageId": "..." | null, "hasDate": bool}
//   {"ok": false, "error": "<why mailparser failed>"}
//
// "text"/"html" are mailparser's own joins of every inline text/plain and
// text/html part; "hasText"/"hasHtml" say whether such a part exists at all
// (so an html-only message reports "text": null, not an html-to-text
// conversion). "contentType" is mailparser's (it guesses a type from the
// filename for application/octet-stream); "declaredType" is the part's own
// Content-Type, lowercased, without parameters. Groups in address fields are
// flattened into their members. Exit status 2 (and a message on stderr)
// means a harness bug: no path given, or an unexpected exception.
import crypto from 'node:crypto';
import fs from 'node:fs';
import { MailParser } from 'mailparser';

function harnessBug(message) {
    process.stderr.write(`harness error: ${message}\n`);
    process.exit(2);
}

process.on('uncaughtException', (err) => harnessBug(err && err.stack ? err.stack : String(err)));
process.on('unhandledRejection', (err) => harnessBug(err && err.stack ? err.stack : String(err)));

const OPTIONS = {
    // Report what the message holds, nothing mailparser would derive from it.
    skipHtmlToText: true,
    skipTextToHtml: true,
    skipImageLinks: true,
    skipTextLinks: true,
    keepCidLinks: true,
    checksumAlgo: 'sha256',
};

/** Flatten a mailparser address object (or list of them) into {name, address} pairs. */
function addresses(field) {
    const out = [];
    const visit = (entry) => {
        if (Array.isArray(entry.group)) {
            entry.group.forEach(visit);
        } else if (entry.address) {
            out.push({ name: entry.name || '', address: entry.address });
        }
    };
    for (const item of [].concat(field || [])) {
        (item.value || []).forEach(visit);
    }
    return out;
}

/** The lowercased type/subtype of a part's own Content-Type header. */
function declaredType(headers) {
    const value = headers && headers.get('content-type');
    const type = value && typeof value === 'object' ? value.value : value;
    return typeof type === 'string' ? type.trim().toLowerCase() : null;
}

/** Parse the message in `raw`; resolves with the result object. */
function parse(raw) {
    return new Promise((resolve, reject) => {
        const parser = new MailParser(OPTIONS);
        const result = {
            ok: true,
            subject: null,
            from: [],
            to: [],
            cc: [],
            text: null,
            html: null,
            hasText: false,
            hasHtml: false,
            attachments: [],
            tags: [],
            messageId: null,
            hasDate: false,
        };
        let headers = null;
        let reading = false;
        let failed = false;
        parser.on('error', (err) => {
            failed = true;
            reject(err);
        });
        parser.on('headers', (value) => {
            headers = value;
        });
        const reader = () => {
            reading = true;
            for (;;) {
                const data = parser.read();
                if (data === null) {
                    reading = false;
                    return;
                }
                if (data.type === 'text') {
                    if (typeof data.text === 'string') {
                        result.text = data.text;
                    }
                    if (typeof data.html === 'string') {
                        result.html = data.html;
                    }
                } else if (data.type === 'attachment') {
                    const hash = crypto.createHash('sha256');
                    let size = 0;
                    const entry = {
                        filename: data.filename === undefined ? null : data.filename,
                        contentType: data.contentType,
                        declaredType: declaredType(data.headers),
                        contentDisposition: data.contentDisposition || null,
                        cid: data.cid || null,
                        related: Boolean(data.related),
                        size: 0,
                        sha256: null,
                    };
                    result.attachments.push(entry);
                    data.content.on('data', (chunk) => {
                        hash.update(chunk);
                        size += chunk.length;
                    });
                    data.content.on('end', () => {
                        entry.size = size;
                        entry.sha256 = hash.digest('hex');
                        data.release();
                        reader();
                    });
                    return;
                }
            }
        };
        parser.on('readable', () => {
            if (!reading) {
                reader();
            }
        });
        parser.on('end', () => {
            if (failed) {
                return;
            }
            result.hasText = Boolean(parser.hasText);
            result.hasHtml = Boolean(parser.hasHtml);
            if (!result.hasText) {
                result.text = null;
            }
            if (!result.hasHtml) {
                result.html = null;
            }
            if (headers) {
                const subject = headers.get('subject');
                result.subject = typeof subject === 'string' ? subject : null;
                result.from = addresses(headers.get('from'));
                result.to = addresses(headers.get('to'));
                result.cc = addresses(headers.get('cc'));
                const tags = headers.get('x-poststack-tags');
                result.tags = tags === undefined ? [] : [].concat(tags).map(String);
                const messageId = headers.get('message-id');
                result.messageId = typeof messageId === 'string' ? messageId : null;
                result.hasDate = headers.has('date');
            }
            resolve(result);
        });
        parser.end(raw);
    });
}

const path = process.argv[2];
if (!path) {
    harnessBug('usage: node parse.mjs <message.eml>');
}
const raw = fs.readFileSync(path);
parse(raw).then(
    (result) => process.stdout.write(JSON.stringify(result) + '\n'),
    (err) => process.stdout.write(JSON.stringify({ ok: false, error: String(err && err.message ? err.message : err) }) + '\n'),
);
