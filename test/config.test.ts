import { test } from 'node:test';
import assert from 'node:assert/strict';
import { availableParallelism } from 'node:os';
import { ConfigError, loadConfig } from '../src/config/config.ts';

const PROD_OK = {
  CUSTOS_ENV: 'production',
  CUSTOS_DATABASE_URL: 'postgres://custos@db.internal:5432/custos',
  CUSTOS_AUDIT_DATABASE_URL: 'postgres://custos_audit@audit.internal:5432/audit',
  CUSTOS_KEYRING_PASSPHRASE: 'a long production passphrase',
  CUSTOS_TRUSTED_PROXIES: '10.0.0.1',
  CUSTOS_PUBLIC_URL: 'https://fhir.example.org',
};

function refusal(env: Record<string, string>): string {
  try {
    loadConfig(env, '/tmp');
  } catch (e) {
    assert.ok(e instanceof ConfigError);
    assert.ok(!e.message.includes('\n'), 'one line');
    return e.message;
  }
  assert.fail('expected the configuration to be refused');
}

test('defaults match INTERFACE.md', () => {
  const c = loadConfig({}, '/srv/app');
  assert.equal(c.env, 'development');
  assert.equal(c.dataDir, '/srv/app/.custos');
  assert.equal(c.host, '127.0.0.1');
  assert.equal(c.port, 8080);
  assert.equal(c.publicUrl, 'http://127.0.0.1:8080');
  assert.equal(c.databaseUrl, undefined);
  assert.equal(c.keyProvider, 'local');
  assert.equal(c.auditCheckpointIntervalSeconds, 60);
  assert.equal(c.auditCheckpointDir, undefined);
  assert.ok(Object.isFrozen(c));
});

test('invalid values stop the start with one line naming the variable', () => {
  assert.match(refusal({ CUSTOS_PORT: 'eighty' }), /^CUSTOS_PORT: /);
  assert.match(refusal({ CUSTOS_ENV: 'staging' }), /^CUSTOS_ENV: must be one of/);
  assert.match(refusal({ CUSTOS_DATABASE_URL: 'mysql://x/y' }), /^CUSTOS_DATABASE_URL: /);
  assert.match(refusal({ CUSTOS_KEY_PROVIDER: 'vault' }), /^CUSTOS_KEY_PROVIDER: /);
  assert.match(refusal({ CUSTOS_TLS_CERT: 'cert.pem' }), /^CUSTOS_TLS_KEY: /);
  assert.match(refusal({ CUSTOS_TRUSTED_PROXIES: 'not an ip' }), /^CUSTOS_TRUSTED_PROXIES: /);
  assert.match(refusal({ CUSTOS_PUBLIC_URL: 'ftp://x' }), /^CUSTOS_PUBLIC_URL: /);
  assert.match(refusal({ CUSTOS_AUDIT_CHECKPOINT_INTERVAL: '1m' }), /^CUSTOS_AUDIT_CHECKPOINT_INTERVAL: /);
});

test('the audit database may not be the resource database, even spelled differently', () => {
  const msg = refusal({
    CUSTOS_DATABASE_URL: 'postgres://a@localhost/custos',
    CUSTOS_AUDIT_DATABASE_URL: 'postgresql://b:secret@127.0.0.1:5432/custos?sslmode=disable',
  });
  assert.match(msg, /^CUSTOS_AUDIT_DATABASE_URL: must not be the resource database/);
  assert.ok(!msg.includes('secret'), 'credentials are not echoed');
});

test('production accepts a safe configuration', () => {
  assert.equal(loadConfig(PROD_OK).env, 'production');
});

test('production refuses each unsafe setting', () => {
  const without = (k: keyof typeof PROD_OK) => {
    const env: Record<string, string> = { ...PROD_OK };
    delete env[k];
    return env;
  };
  assert.match(
    refusal(without('CUSTOS_DATABASE_URL')),
    /^CUSTOS_DATABASE_URL: production refuses embedded storage/,
  );
  assert.match(refusal(without('CUSTOS_AUDIT_DATABASE_URL')), /^CUSTOS_AUDIT_DATABASE_URL: /);
  assert.match(
    refusal(without('CUSTOS_KEYRING_PASSPHRASE')),
    /^CUSTOS_KEYRING_PASSPHRASE: production refuses the development keyring/,
  );
  assert.match(
    refusal(without('CUSTOS_TRUSTED_PROXIES')),
    /^CUSTOS_TLS_CERT: production refuses plaintext HTTP/,
  );
  assert.match(
    refusal({ ...PROD_OK, CUSTOS_AUDIT_DATABASE_URL: PROD_OK.CUSTOS_DATABASE_URL }),
    /must not be the resource database/,
  );
});

test('CUSTOS_SMTP_*: smtps:// only, a sender, credentials together; stray settings without the URL refused', () => {
  const ok = loadConfig(
    {
      CUSTOS_SMTP_URL: 'smtps://Relay.Example.org',
      CUSTOS_SMTP_FROM: 'notifications@example.org',
      CUSTOS_SMTP_USER: 'custos',
      CUSTOS_SMTP_PASSWORD: 'relay secret 0001',
      CUSTOS_SMTP_CA_FILE: 'ca.pem',
    },
    '/srv/app',
  ).smtp;
  assert.deepEqual(ok, {
    host: 'relay.example.org',
    port: 465,
    from: 'notifications@example.org',
    user: 'custos',
    password: 'relay secret 0001',
    caFile: '/srv/app/ca.pem',
    recipientDomains: [],
  });
  assert.deepEqual(
    loadConfig({
      CUSTOS_SMTP_URL: 'smtps://relay.example.org',
      CUSTOS_SMTP_FROM: 'n@example.org',
      CUSTOS_SMTP_RECIPIENT_DOMAINS: 'Clinic.Example.org, example.net.',
    }).smtp?.recipientDomains,
    ['clinic.example.org', 'example.net'],
  );
  assert.match(
    refusal({
      CUSTOS_SMTP_URL: 'smtps://relay.example.org',
      CUSTOS_SMTP_FROM: 'n@example.org',
      CUSTOS_SMTP_RECIPIENT_DOMAINS: '*.example.org',
    }),
    /^CUSTOS_SMTP_RECIPIENT_DOMAINS: /,
  );
  assert.equal(loadConfig({}).smtp, undefined);
  const from = { CUSTOS_SMTP_FROM: 'n@example.org' };
  assert.match(
    refusal({ CUSTOS_SMTP_URL: 'smtp://relay.example.org:587', ...from }),
    /^CUSTOS_SMTP_URL: must start with smtps:\/\/ .*STARTTLS are refused/,
  );
  const withCreds = refusal({ CUSTOS_SMTP_URL: 'smtps://u:hunter2@relay.example.org', ...from });
  assert.match(withCreds, /^CUSTOS_SMTP_URL: must be a host and port only/);
  assert.ok(!withCreds.includes('hunter2'), 'credentials are not echoed');
  assert.match(refusal({ CUSTOS_SMTP_URL: 'smtps://relay.example.org' }), /^CUSTOS_SMTP_FROM: /);
  assert.match(
    refusal({ CUSTOS_SMTP_URL: 'smtps://relay.example.org', CUSTOS_SMTP_FROM: 'Custos <n@example.org>' }),
    /^CUSTOS_SMTP_FROM: /,
  );
  assert.match(
    refusal({ CUSTOS_SMTP_URL: 'smtps://relay.example.org', ...from, CUSTOS_SMTP_USER: 'u' }),
    /^CUSTOS_SMTP_PASSWORD: .*set together/,
  );
  assert.match(
    refusal({ CUSTOS_SMTP_FROM: 'n@example.org' }),
    /^CUSTOS_SMTP_FROM: is set but CUSTOS_SMTP_URL is not/,
  );
});

test('CUSTOS_SUBSCRIPTION_*: delivery settings with defaults and bounds', () => {
  assert.deepEqual(loadConfig({}).subscriptionDelivery, {
    maxAttempts: 8,
    retryMaxSeconds: 600,
    timeoutSeconds: 10,
  });
  assert.deepEqual(
    loadConfig({
      CUSTOS_SUBSCRIPTION_MAX_ATTEMPTS: '3',
      CUSTOS_SUBSCRIPTION_RETRY_MAX: '60',
      CUSTOS_SUBSCRIPTION_TIMEOUT: '30',
    }).subscriptionDelivery,
    { maxAttempts: 3, retryMaxSeconds: 60, timeoutSeconds: 30 },
  );
  assert.match(
    refusal({ CUSTOS_SUBSCRIPTION_MAX_ATTEMPTS: '0' }),
    /^CUSTOS_SUBSCRIPTION_MAX_ATTEMPTS: must be a whole number from 1 to 100/,
  );
  assert.match(
    refusal({ CUSTOS_SUBSCRIPTION_RETRY_MAX: '1' }),
    /^CUSTOS_SUBSCRIPTION_RETRY_MAX: .*from 2 to 86400/,
  );
  assert.match(refusal({ CUSTOS_SUBSCRIPTION_TIMEOUT: '10s' }), /^CUSTOS_SUBSCRIPTION_TIMEOUT: /);
});

test('CUSTOS_DATABASE_POOL_SIZE: connections per pool, default cores + 1, bounded', () => {
  assert.equal(loadConfig({}).databasePoolSize, availableParallelism() + 1);
  assert.equal(loadConfig({ CUSTOS_DATABASE_POOL_SIZE: '12' }).databasePoolSize, 12);
  assert.match(
    refusal({ CUSTOS_DATABASE_POOL_SIZE: '0' }),
    /^CUSTOS_DATABASE_POOL_SIZE: must be a whole number from 1 to 100/,
  );
  assert.match(refusal({ CUSTOS_DATABASE_POOL_SIZE: 'ten' }), /^CUSTOS_DATABASE_POOL_SIZE: /);
});
