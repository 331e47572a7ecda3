//! Secrets of every kind the fleet's redaction set must catch, each inside a line of text,
//! with the exact text that line must become. Sinks' tests send every sample through the
//! sink (logs, API answers, the audit trail, stored summaries, alerts) and compare.
//!
//! The secrets are made up, in the real formats (prefix, length, alphabet).

/// One secret in context.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// What kind of secret, for failure messages.
    pub name: &'static str,
    /// A line holding the secret.
    pub text: &'static str,
    /// Exactly what `text` must become.
    pub redacted: &'static str,
    /// A part of the secret that must never be seen again.
    pub secret: &'static str,
}

const fn s(name: &'static str, text: &'static str, redacted: &'static str, secret: &'static str) -> Sample {
    Sample { name, text, redacted, secret }
}

/// Every kind, one or more lines each.
pub const SAMPLES: &[Sample] = &[
    s("aws access key id", "key AKIAIOSFODNN7EXAMPLE in use", "key **REDACTED** in use", "IOSFODNN7"),
    s("aws temporary key id", "ASIAY34FZKBOKMUTVV7A expired", "**REDACTED** expired", "Y34FZKBOK"),
    s(
        "aws secret access key",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "aws_secret_access_key = **REDACTED**",
        "wJalrXUtnFEMI",
    ),
    s(
        "aws key pair",
        "creds AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY ok",
        "creds **REDACTED** ok",
        "wJalrXUtnFEMI",
    ),
    s(
        "aws secret as json",
        r#"{"AccessKeyId": "x", "SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}"#,
        r#"{"AccessKeyId": "x", "SecretAccessKey": "**REDACTED**"}"#,
        "wJalrXUtnFEMI",
    ),
    s("github ghp", "token ghp_0123456789abcdefghijABCDEFGHIJ012345 set", "token **REDACTED** set", "ghp_0123"),
    s("github gho", "gho_16C7e42F292c6912E7710c838347Ae178B4a", "**REDACTED**", "gho_16C7"),
    s("github ghs", "GH=ghs_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789", "GH=**REDACTED**", "ghs_AbCd"),
    s("github ghu", "(ghu_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789)", "(**REDACTED**)", "ghu_AbCd"),
    s(
        "github fine-grained pat",
        "github_pat_11AAAAAAA0123456789abcde_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop",
        "**REDACTED**",
        "github_pat_11A",
    ),
    s("gitlab pat", "GITLAB_TOKEN=glpat-Abc123Def456Ghi789Jk", "GITLAB_TOKEN=**REDACTED**", "glpat-Abc1"),
    s("slack bot", "xoxb-2048-123456789012-AbCdEfGhIjKlMnOpQrStUvWx", "**REDACTED**", "AbCdEfGhIjKl"),
    s(
        "slack user",
        "slack xoxp-2048-123456789012-123456789012-0123456789abcdef0123456789abcdef!",
        "slack **REDACTED**!",
        "0123456789abcdef0123",
    ),
    s("slack app", "xapp-1-A0123456789-1234567890123-0123456789abcdef", "**REDACTED**", "xapp-1-A01"),
    s(
        "anthropic key",
        "ANTHROPIC_API_KEY=sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789_-AbCdEf",
        "ANTHROPIC_API_KEY=**REDACTED**",
        "sk-ant-api03",
    ),
    s(
        "openai project key",
        "key: 'sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789'",
        "key: '**REDACTED**'",
        "sk-proj-AbCd",
    ),
    s("openai key", "use sk-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCdEfGh now", "use **REDACTED** now", "sk-AbCdE"),
    s(
        "authorization bearer",
        "Authorization: Bearer 0123456789abcdef0123456789abcdef",
        "Authorization: Bearer **REDACTED**",
        "0123456789abcdef",
    ),
    s(
        "authorization basic",
        "authorization: Basic YWxpY2U6aHVudGVyMg==",
        "authorization: Basic **REDACTED**",
        "YWxpY2U6aHVudGVyMg",
    ),
    s(
        "authorization token",
        "curl -H 'Authorization: token 0123456789abcdef0123456789abcdef01234567' https://api.github.com",
        "curl -H 'Authorization: token **REDACTED**' https://api.github.com",
        "0123456789abcdef",
    ),
    s(
        "jwt",
        "lease eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJvbGdhIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ granted",
        "lease **REDACTED** granted",
        "eyJzdWIiOiJvbGdhIn0",
    ),
    s(
        "rsa private key",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0123456789abcdef\nQUJDREVGR0hJSktMTU5PUFFSU1RVVldY\n-----END RSA PRIVATE KEY-----\nthen",
        "**REDACTED**\nthen",
        "MIIEowIBAAKCAQEA",
    ),
    s(
        "openssh private key",
        "key:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\nAAAAAAABAAAAMwAAAAtzc2gtZWQyNTUx\n-----END OPENSSH PRIVATE KEY-----",
        "key:\n**REDACTED**",
        "b3BlbnNzaC1rZXkt",
    ),
    s(
        "pkcs8 private key cut short",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0wQTApBgkq",
        "**REDACTED**",
        "MIIFHDBOBgkq",
    ),
    s(
        "postgres url",
        "connect postgres://app:hunter2@db.internal:5432/fleet failed",
        "connect postgres://app:**REDACTED**@db.internal:5432/fleet failed",
        "hunter2",
    ),
    s("redis url upper case", "REDIS://:S3cr3t-Pa55@cache:6379/0", "REDIS://:**REDACTED**@cache:6379/0", "S3cr3t"),
    s(
        "rediss url with @ in the password",
        "rediss://default:pa55@w0rd@cache:6380",
        "rediss://default:**REDACTED**@cache:6380",
        "pa55",
    ),
    s(
        "https url",
        "clone https://ci-bot:Gl4ss-S3cret@git.example.com/org/app.git",
        "clone https://ci-bot:**REDACTED**@git.example.com/org/app.git",
        "Gl4ss",
    ),
    s(
        "libpq password",
        "host=db user=app password=hunter2 sslmode=require",
        "host=db user=app password=**REDACTED** sslmode=require",
        "hunter2",
    ),
    s("env password", "set POSTGRES_PASSWORD=hunter2.", "set POSTGRES_PASSWORD=**REDACTED**.", "hunter2"),
    s(
        "odbc pwd",
        "Server=db;Database=fleet;Uid=app;Pwd=hunter2;",
        "Server=db;Database=fleet;Uid=app;Pwd=**REDACTED**;",
        "hunter2",
    ),
    s("single-quoted password", "password='hunter 2' host=db", "password='**REDACTED**' host=db", "hunter"),
    s("double-quoted password", r#"PASSWORD="hunter 2" host=db"#, r#"PASSWORD="**REDACTED**" host=db"#, "hunter"),
    s(
        "password in json",
        r#"{"password": "hunter2", "user": "app"}"#,
        r#"{"password": "**REDACTED**", "user": "app"}"#,
        "hunter2",
    ),
    s(
        "telegram bot token",
        "POST https://api.telegram.org/bot123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0/sendMessage",
        "POST https://api.telegram.org/bot**REDACTED**/sendMessage",
        "AAHdqTcv",
    ),
];
