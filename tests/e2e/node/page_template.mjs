// PostStack SMTP page, "Using Templates via SMTP": the template example, as written.
//
// The page shows only the sendMail() call and reuses the transporter of its
// first example; that transporter is repeated here. Every line that differs
// from the page carries a "DEVIATION:" comment. Run by
// tests/common/node.py; see _harness.mjs for the environment and the
// one-line JSON output.
//
// Usage: SMTP_HOST=127.0.0.1 SMTP_PORT=<port> SMTP_CA=<cert.pem> \
//        [SMTP_USER=...] [SMTP_PASS=...] node page_template.mjs
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
        subject: '', // Overridden by template
        text: '', // Overridden by template
        headers: {
            'X-PostStack-Template-Id': 'tpl_abc123def456ghi789',
            'X-PostStack-Variables': JSON.stringify({
                first_name: 'Alice',
                company_name: 'Acme Inc',
            }),
        },
    });
} catch (err) { // DEVIATION: report the refusal
    reportFailure(err);
}
if (info !== undefined) reportSuccess(info); // DEVIATION: report the result
