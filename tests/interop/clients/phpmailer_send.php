<?php
// PHPMailer 6.x (Debian's libphp-phpmailer) sending one message through the
// relay with the settings docs/interop.md gives ("PHPMailer"). Run by
// tests/interop/test_php_ruby_clients.py.
//
// Environment:
//   SMTP_HOST, SMTP_PORT   where the relay listens (host 'localhost': the
//                          name in the test certificate)
//   SMTP_CA                PEM file to trust (the relay's self-signed certificate)
//   SMTP_USER, SMTP_PASS   the login
//   SMTP_SECURE            'smtps' (PHPMailer::ENCRYPTION_SMTPS, the right
//                          setting) or 'starttls' (ENCRYPTION_STARTTLS, the
//                          common mistake)
//   SMTP_DEBUG             '0' (PHPMailer's default: the server's replies are
//                          hidden) or '2' (SMTP::DEBUG_SERVER: they are shown)
//   MESSAGE                path of a JSON file: from, to, cc, bcc, reply_to
//                          ([address, name] pairs; bcc plain addresses),
//                          subject, text, html, tags, attachments and inline
//                          ({path, name, type[, cid]})
// Output: one JSON line on stdout: {"ok": bool, "error": ErrorInfo or the
// exception's message, "debug": [lines PHPMailer's Debugoutput received]}.
// Exit status 2 means a harness bug.

require '/usr/share/php/libphp-phpmailer/autoload.php';

use PHPMailer\PHPMailer\PHPMailer;
use PHPMailer\PHPMailer\SMTP;
use PHPMailer\PHPMailer\Exception;

function need($name) {
    $value = getenv($name);
    if ($value === false || $value === '') {
        fwrite(STDERR, "harness error: environment variable $name is required\n");
        exit(2);
    }
    return $value;
}

$spec = json_decode(file_get_contents(need('MESSAGE')), true, 512, JSON_THROW_ON_ERROR);
$debug = [];

$mail = new PHPMailer(true);                          // exceptions on errors
try {
    // -- the settings docs/interop.md documents --------------------------
    $mail->isSMTP();
    $mail->Host = need('SMTP_HOST');                  // e.g. 'smtp.poststack.dev'
    $mail->Port = (int) need('SMTP_PORT');            // 587
    $mail->SMTPSecure = need('SMTP_SECURE') === 'smtps'
        ? PHPMailer::ENCRYPTION_SMTPS                 // implicit TLS: required
        : PHPMailer::ENCRYPTION_STARTTLS;             // the mistake
    $mail->SMTPAuth = true;
    $mail->Username = need('SMTP_USER');              // 'poststack'
    $mail->Password = need('SMTP_PASS');              // 'sk_live_...'
    $mail->SMTPOptions = ['ssl' => ['cafile' => need('SMTP_CA')]];  // only for a private CA
    $mail->CharSet = PHPMailer::CHARSET_UTF8;
    $mail->Timeout = 20;
    $mail->SMTPDebug = (int) need('SMTP_DEBUG');      // SMTP::DEBUG_SERVER (2) shows the replies
    $mail->Debugoutput = function ($line, $level) use (&$debug) { $debug[] = rtrim($line); };

    // -- the message -------------------------------------------------------
    $mail->setFrom($spec['from'][0], $spec['from'][1]);
    foreach ($spec['to'] as [$address, $name]) { $mail->addAddress($address, $name); }
    foreach ($spec['cc'] as [$address, $name]) { $mail->addCC($address, $name); }
    foreach ($spec['bcc'] as $address) { $mail->addBCC($address); }
    $mail->addReplyTo($spec['reply_to'][0], $spec['reply_to'][1]);
    $mail->Subject = $spec['subject'];
    $mail->isHTML(true);
    $mail->Body = $spec['html'];
    $mail->AltBody = $spec['text'];
    $mail->addCustomHeader('X-PostStack-Tags', $spec['tags']);
    foreach ($spec['attachments'] as $a) {
        $mail->addAttachment($a['path'], $a['name'], PHPMailer::ENCODING_BASE64, $a['type']);
    }
    foreach ($spec['inline'] as $i) {
        $mail->addEmbeddedImage($i['path'], $i['cid'], $i['name'], PHPMailer::ENCODING_BASE64, $i['type']);
    }
    $mail->send();
    echo json_encode(['ok' => true, 'error' => null, 'debug' => $debug]), "\n";
} catch (Exception $e) {
    echo json_encode(['ok' => false, 'error' => $mail->ErrorInfo ?: $e->getMessage(), 'debug' => $debug]), "\n";
}
