// The common mistake: the page's first example with "secure: false", i.e. a
// plaintext client on the implicit-TLS port.
//
// The relay is expected to answer the plaintext client with one plaintext
// "554 5.7.0 ..." line and close; nodemailer then fails. The JSON line records
// what nodemailer saw ("error", "errorCode", "code", "response") so a test can
// assert on it. Short connection/greeting timeouts (5 s) keep the run bounded
// even if the server says nothing at all (then errorCode is "ETIMEDOUT").
//
// Usage: SMTP_HOST=127.0.0.1 SMTP_PORT=<port> SMTP_CA=<cert.pem> \
//        [SMTP_USER=...] [SMTP_PASS=...] node plaintext_misconfig.mjs
import { SMTP_HOST, SMTP_PORT, testTls, reportSuccess, reportFailure } from './_harness.mjs'; // DEVIATION: test plumbing
import nodemailer from 'nodemailer';

const transporter = nodemailer.createTransport({
    host: SMTP_HOST, // DEVIATION: the page has 'smtp.poststack.dev'
    port: SMTP_PORT, // DEVIATION: the page has 587
    secure: false, // DEVIATION (the point of this script): the mistake, plaintext on the implicit-TLS port
    auth: {
        user: process.env.SMTP_USER ?? 'poststack', // DEVIATION: overridable by SMTP_USER; the page's value is the default
        pass: process.env.SMTP_PASS ?? 'sk_live_...', // DEVIATION: overridable by SMTP_PASS; the page's value is the default
    },
    tls: testTls(), // DEVIATION: trust the test's self-signed certificate (ca + servername 'localhost')
    connectionTimeout: 5000, // DEVIATION: bound the test (nodemailer's default is 2 minutes)
    greetingTimeout: 5000, // DEVIATION: bound the test (nodemailer's default is 30 s)
    socketTimeout: 5000, // DEVIATION: bound the test (nodemailer's default is 10 minutes)
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
