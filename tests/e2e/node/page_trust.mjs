// The page's first Node example against `make run`, trusting the relay's
// self-signed .run/cert.pem as README.md and docs/interop.md ("Trusting a
// self-signed certificate") say: connect to 'localhost' (the name in the
// certificate), and trust the certificate either through the environment
// (NODE_EXTRA_CA_CERTS, no code change) or through tls.ca.
//
// Usage: SMTP_HOST=localhost SMTP_PORT=<port> SMTP_CA=<cert.pem> \
//        [SMTP_USER=...] [SMTP_PASS=...] node page_trust.mjs env|ca
//   env  no tls option at all: only NODE_EXTRA_CA_CERTS (set by the caller,
//        or not) makes node trust the certificate
//   ca   tls: { ca: fs.readFileSync(SMTP_CA) }, nothing else (no servername:
//        the host name itself is checked against the certificate)
import fs from 'node:fs'; // DEVIATION: for tls.ca
import { SMTP_HOST, SMTP_PORT, harnessBug, reportSuccess, reportFailure } from './_harness.mjs'; // DEVIATION: test plumbing
import nodemailer from 'nodemailer';

const variant = process.argv[2]; // DEVIATION: which way of trusting
if (variant !== 'env' && variant !== 'ca') harnessBug(`unknown variant ${JSON.stringify(variant)}`);

const options = {
    host: SMTP_HOST, // DEVIATION: the page has 'smtp.poststack.dev'; the docs say 'localhost' for make run
    port: SMTP_PORT, // DEVIATION: the page has 587; make run listens on 8587
    secure: true, // implicit TLS — required
    auth: {
        user: process.env.SMTP_USER ?? 'poststack', // DEVIATION: overridable by SMTP_USER; the page's value is the default
        pass: process.env.SMTP_PASS ?? 'sk_live_...', // DEVIATION: overridable by SMTP_PASS; the page's value is the default
    },
    connectionTimeout: 10000, // DEVIATION: bound the test (nodemailer's default is 2 minutes)
    greetingTimeout: 10000, // DEVIATION: bound the test (nodemailer's default is 30 s)
    socketTimeout: 20000, // DEVIATION: bound the test (nodemailer's default is 10 minutes)
};
if (variant === 'ca') options.tls = { ca: fs.readFileSync(process.env.SMTP_CA) }; // DEVIATION: the documented tls.ca
const transporter = nodemailer.createTransport(options);

let info; // DEVIATION: the result is kept and reported as JSON
try { // DEVIATION: a refusal is reported, not thrown
    info = await transporter.sendMail({ // DEVIATION: "info =" added
        from: 'you@yourdomain.com',
        to: 'user@example.com',
        subject: 'Hello from PostStack SMTP',
        html: '<p>Sent via SMTP relay!</p>',
        headers: {
            'X-PostStack-Tags': 'welcome,onboarding',
        },
    });
} catch (err) { // DEVIATION: report the refusal
    reportFailure(err, { variant });
}
if (info !== undefined) reportSuccess(info, { variant }); // DEVIATION: report the result
