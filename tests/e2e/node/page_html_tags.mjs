// PostStack SMTP page, "Node.js (Nodemailer)": the first example, as written.
//
// Every line that differs from the page carries a "DEVIATION:" comment; all
// other lines of the transport options and of the sendMail() argument are the
// page's own. Run by tests/common/node.py; see _harness.mjs for the
// environment and the one-line JSON output.
//
// Usage: SMTP_HOST=127.0.0.1 SMTP_PORT=<port> SMTP_CA=<cert.pem> \
//        [SMTP_USER=...] [SMTP_PASS=...] node page_html_tags.mjs
import { SMTP_HOST, SMTP_PORT, testTls, reportSuccess, reportFailure } from './_harness.mjs'; // DEVIATION: test plumbing
import nodemailer from 'nodemailer';

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
    reportFailure(err);
}
if (info !== undefined) reportSuccess(info); // DEVIATION: report the result
