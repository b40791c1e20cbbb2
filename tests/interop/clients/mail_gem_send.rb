# The Ruby mail gem (Debian's ruby-mail; what Rails' ActionMailer uses)
# sending one message through the relay with the delivery settings
# docs/interop.md gives ("Ruby"). Run by tests/interop/test_php_ruby_clients.py.
#
# Environment:
#   SMTP_HOST, SMTP_PORT   where the relay listens ('localhost': the name in
#                          the test certificate)
#   SMTP_CA                PEM file to trust (the relay's self-signed certificate)
#   SMTP_USER, SMTP_PASS   the login
#   SMTP_SECURE            'tls' (tls: true, the right setting), 'ssl'
#                          (ssl: true, its alias) or 'default' (neither: the
#                          mail gem's default enable_starttls_auto, the mistake)
#   MESSAGE                path of a JSON file: from, to, cc, reply_to
#                          ([address, name] pairs), bcc (addresses), subject,
#                          text, html, tags, attachments and inline
#                          ({path, name, type[, cid]})
# Output: one JSON line on stdout: {"ok": bool, "response": the final reply
# or null, "error": "ExceptionClass: message" or null}. Exit status 2 means a
# harness bug.
require 'json'
require 'mail'

def need(name)
  value = ENV[name]
  if value.nil? || value.empty?
    warn "harness error: environment variable #{name} is required"
    exit 2
  end
  value
end

spec = JSON.parse(File.read(need('MESSAGE')))
secure = need('SMTP_SECURE')

# -- the delivery settings docs/interop.md documents (ActionMailer's
#    config.action_mailer.smtp_settings takes the same hash) ------------------
settings = {
  address: need('SMTP_HOST'),            # 'smtp.poststack.dev'
  port: Integer(need('SMTP_PORT')),      # 587
  user_name: need('SMTP_USER'),          # 'poststack'
  password: need('SMTP_PASS'),           # 'sk_live_...'
  authentication: :plain,
  ca_file: need('SMTP_CA'),              # only for a private CA
  open_timeout: 20,
  read_timeout: 20,
  return_response: true,
}
settings[:tls] = true if secure == 'tls'   # implicit TLS: required
settings[:ssl] = true if secure == 'ssl'   # the same, under its other name
unless %w[tls ssl default].include?(secure)
  warn "harness error: unknown SMTP_SECURE #{secure}"
  exit 2
end

def named(pair)
  address = Mail::Address.new(pair[0])
  address.display_name = pair[1] unless pair[1].nil? || pair[1].empty?
  address.format
end

mail = Mail.new
mail.charset = 'UTF-8'
mail.from = named(spec['from'])
mail.to = spec['to'].map { |pair| named(pair) }
mail.cc = spec['cc'].map { |pair| named(pair) }
mail.bcc = spec['bcc']
mail.reply_to = named(spec['reply_to'])
mail.subject = spec['subject']
mail['X-PostStack-Tags'] = spec['tags']
text = spec['text']
html = spec['html']
mail.text_part = Mail::Part.new { content_type 'text/plain; charset=UTF-8'; body text }
mail.html_part = Mail::Part.new { content_type 'text/html; charset=UTF-8'; body html }
spec['attachments'].each do |a|
  mail.attachments[a['name']] = { mime_type: a['type'], content: File.binread(a['path']) }
end
spec['inline'].each do |i|
  mail.attachments.inline[i['name']] = { mime_type: i['type'], content: File.binread(i['path']),
                                         content_id: "<#{i['cid']}>" }
end
mail.delivery_method :smtp, settings

begin
  response = mail.deliver!
  puts JSON.generate(ok: true, response: response.respond_to?(:string) ? response.string.strip : response.to_s,
                     error: nil)
rescue StandardError => e
  puts JSON.generate(ok: false, response: nil, error: "#{e.class}: #{e.message}")
end
