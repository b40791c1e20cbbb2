// Richer message shapes nodemailer users send, beyond the page's examples.
//
// The transporter is the page's first example (same deviations, each marked);
// the message is chosen by the first argument:
//   full      html + text, two attachments (one with a non-ASCII filename)
//             and an embedded image referenced by cid:
//   calendar  an icalEvent (text/calendar alternative + .ics attachment)
//   list      list headers (List-Unsubscribe, List-ID)
//   ccbcc     to, cc and bcc with display names (bcc only in the envelope)
//   intl      UTF-8 local parts, IDN domains, Unicode names and subject
//             (nodemailer declares SMTPUTF8 itself when the server offers it)
// The JSON line also carries "variant" and "sent" (the message object, Buffers
// as {"base64": ...}) so a test can compare what arrived with what was sent.
//
// Usage: SMTP_HOST=127.0.0.1 SMTP_PORT=<port> SMTP_CA=<cert.pem> \
//        [SMTP_USER=...] [SMTP_PASS=...] node rich.mjs full|calendar|list|ccbcc|intl
import {
    SMTP_HOST, SMTP_PORT, testTls, reportSuccess, reportFailure, describeMessage, harnessBug,
} from './_harness.mjs';
import nodemailer from 'nodemailer';

// A 1x1 transparent PNG.
const PIXEL_PNG = Buffer.from(
    'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==',
    'base64',
);

const ICS = [
    'BEGIN:VCALENDAR',
    'VERSION:2.0',
    'PRODID:-//poststack-relay//e2e//EN',
    'METHOD:REQUEST',
    'BEGIN:VEVENT',
    'UID:e2e-0001@yourdomain.com',
    'DTSTAMP:20250101T090000Z',
    'DTSTART:20250102T100000Z',
    'DTEND:20250102T110000Z',
    'SUMMARY:Kick-off',
    'ORGANIZER;CN=You:mailto:you@yourdomain.com',
    'ATTENDEE;CN=User;RSVP=TRUE:mailto:user@example.com',
    'END:VEVENT',
    'END:VCALENDAR',
    '',
].join('\r\n');

const VARIANTS = {
    full: () => ({
        from: 'you@yourdomain.com',
        to: 'user@example.com',
        subject: 'Rich message: html, text, attachments, inline image',
        text: 'Plain-text part.\nSecond line.',
        html: '<p>HTML part with an inline image:</p><img src="cid:logo@yourdomain.com" alt="logo">',
        attachments: [
            {
                filename: 'notes.txt',
                content: 'First attachment, plain ASCII.\n',
                contentType: 'text/plain',
            },
            {
                filename: 'Übersicht_été_報告.pdf',
                content: Buffer.from('%PDF-1.4\n% not a real PDF, just bytes: \u00ff\u00fe\n', 'latin1'),
                contentType: 'application/pdf',
            },
            {
                filename: 'logo.png',
                content: PIXEL_PNG,
                contentType: 'image/png',
                cid: 'logo@yourdomain.com',
            },
        ],
    }),
    calendar: () => ({
        from: 'you@yourdomain.com',
        to: 'user@example.com',
        subject: 'Invitation: Kick-off',
        text: 'You are invited to the kick-off.',
        html: '<p>You are invited to the kick-off.</p>',
        icalEvent: {
            filename: 'invite.ics',
            method: 'REQUEST',
            content: ICS,
        },
    }),
    list: () => ({
        from: 'you@yourdomain.com',
        to: 'user@example.com',
        subject: 'Newsletter with list headers',
        text: 'This month in news.',
        list: {
            unsubscribe: {
                url: 'https://yourdomain.com/unsubscribe?u=123',
                comment: 'Unsubscribe',
            },
            id: {
                url: 'news.yourdomain.com',
                comment: 'Your Domain News',
            },
        },
    }),
    ccbcc: () => ({
        from: '"You at Your Domain" <you@yourdomain.com>',
        to: '"User Example" <user@example.com>',
        cc: [{ name: 'Zoë Carbon-Copy', address: 'cc@example.com' }],
        bcc: 'Blind Copy <bcc@example.com>',
        subject: 'To, Cc and Bcc with display names',
        text: 'Three recipients, one of them blind.',
    }),
    intl: () => ({
        from: '"Jörg Müller" <jörg@bücher.example>',
        to: [{ name: '用户', address: '用户@例子.example' }, '"Ivanov, Ivan" <иван@bücher.example>'],
        cc: [{ name: 'José', address: 'josé@example.com' }],
        bcc: 'hidden@bücher.example',
        replyTo: '"Müller, Jörg" <antwort@bücher.example>',
        subject: 'Grüße aus Köln 👋',
        text: 'Grüße, 用户!',
    }),
};

const variant = process.argv[2];
if (!Object.hasOwn(VARIANTS, variant)) {
    harnessBug(`first argument must be one of ${Object.keys(VARIANTS).join(', ')}; got ${JSON.stringify(variant)}`);
}
const message = VARIANTS[variant]();
const extra = { variant, sent: describeMessage(message) };

const transporter = nodemailer.createTransport({
    host: SMTP_HOST, // DEVIATION: the page has 'smtp.poststack.dev'
    port: SMTP_PORT, // DEVIATION: the page has 587
    secure: true, // implicit TLS — required
    auth: {
        user: process.env.SMTP_USER ?? 'poststack', // DEVIATION: overridable by SMTP_USER; the page's value is the default
        pass: process.env.SMTP_PASS ?? 'sk_live_...', // DEVIATION: overridable by SMTP_PASS; the page's value is the default
    },
    tls: testTls(), // DEVIATION: trust the test's self-signed certificate (ca + servername 'localhost')
});

let info;
try {
    info = await transporter.sendMail(message);
} catch (err) {
    reportFailure(err, extra);
}
if (info !== undefined) reportSuccess(info, extra);
