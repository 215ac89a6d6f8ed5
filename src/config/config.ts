import { availableParallelism } from 'node:os';
import path from 'node:path';

/**
 * The one typed configuration of a Custos process, loaded once at start from the environment
 * (INTERFACE.md, "Configuration") and frozen. Modules receive the part they need as arguments;
 * there is no global config singleton.
 */
export interface Config {
  readonly env: 'development' | 'production';
  readonly dataDir: string;
  /** PostgreSQL for resources; undefined means embedded PGlite under dataDir. */
  readonly databaseUrl: string | undefined;
  /** PostgreSQL for the audit log; undefined means a separate embedded database under dataDir. */
  readonly auditDatabaseUrl: string | undefined;
  readonly host: string;
  readonly port: number;
  readonly publicUrl: string;
  readonly tls: { readonly certFile: string; readonly keyFile: string } | undefined;
  readonly trustedProxies: readonly string[];
  readonly keyProvider: 'local' | 'pkcs11' | 'aws-kms';
  /** Undefined means the generated development passphrase (refused in production). */
  readonly keyringPassphrase: string | undefined;
  readonly logLevel: 'debug' | 'info' | 'warn' | 'error';
  /** Maximum merge delay: `serve` signs a checkpoint at least this often while the log grows (0 = never). */
  readonly auditCheckpointIntervalSeconds: number;
  /** A directory outside both databases where every signed checkpoint is also written. */
  readonly auditCheckpointDir: string | undefined;
  /**
   * Years audit entries are kept before `custos audit archive` may move them out (default 6; less is
   * refused: 45 CFR 164.316(b)(2)). Nothing in Custos removes entries on its own.
   */
  readonly auditRetentionYears: number;
  /**
   * CUSTOS_AUDIT_WITNESSES: witnesses that cosign the signed checkpoints (C2SP tlog-witness), each a
   * verifier key (signature type 0x04) and a submission prefix URL; empty = none (docs/audit.md).
   */
  readonly auditWitnesses: readonly { readonly vkey: string; readonly url: string }[];
  /**
   * Search index extraction on writes (default on). `off` exists to measure its write cost in
   * bench/: resources written with it off are not found by search until `custos reindex`.
   * Production refuses it.
   */
  readonly searchIndexing: boolean;
  /** Field-level encryption of protected elements (default on; `off` only for bench/; production refuses it). */
  readonly encryption: boolean;
  /** Also protect Patient.address and telecom (the opt-in `contact` class). */
  readonly protectContact: boolean;
  /** Expected rows per blind-indexed parameter, for planning the blind-index size (docs/encryption.md). */
  readonly blindIndexPopulation: number;
  /** Login sessions end after this many minutes without use (HIPAA automatic logoff; docs/users.md). */
  readonly sessionIdleMinutes: number;
  /** Login sessions end this many hours after login, whatever the activity. */
  readonly sessionMaxHours: number;
  /** CUSTOS_KEY_PROVIDER=pkcs11: the HSM (docs/keys.md). */
  readonly pkcs11: { module: string; tokenLabel: string; pin: string } | undefined;
  /**
   * CUSTOS_SIEM_URL: forward the audit log to a SIEM as RFC 5424 syslog over TLS (RFC 5425);
   * undefined = off (docs/audit.md, "Forwarding to a SIEM"). Files are read at start.
   */
  readonly siem:
    | {
        readonly host: string;
        readonly port: number;
        readonly caFile: string | undefined;
        readonly clientCertFile: string | undefined;
        readonly clientKeyFile: string | undefined;
        readonly retryMaxSeconds: number;
      }
    | undefined;
  /**
   * CUSTOS_SMTP_URL: the SMTP relay of e-mail notifications, reached by implicit TLS through the
   * egress gateway (it must be a registered vendor endpoint with protocol tls); undefined = e-mail
   * off (docs/phi-boundary.md, "E-mail"). The CA file is read at start.
   */
  readonly smtp:
    | {
        readonly host: string;
        readonly port: number;
        readonly from: string;
        readonly user: string | undefined;
        readonly password: string | undefined;
        readonly caFile: string | undefined;
        /**
         * CUSTOS_SMTP_RECIPIENT_DOMAINS: the only domains (and their subdomains) that e-mail carrying
         * PHI may be addressed to; empty: none (e-mail without PHI goes anywhere).
         */
        readonly recipientDomains: readonly string[];
      }
    | undefined;
  /**
   * CUSTOS_SUBSCRIPTION_*: delivery of subscription notifications (docs/phi-boundary.md,
   * "Delivery semantics"): attempts before a dead letter, the longest wait between two, and the
   * time limit of one attempt.
   */
  readonly subscriptionDelivery: {
    readonly maxAttempts: number;
    readonly retryMaxSeconds: number;
    readonly timeoutSeconds: number;
  };
  /**
   * CUSTOS_DATABASE_POOL_SIZE: connections to the resource database per pool (one for reads and
   * writes, one for searches), with a PostgreSQL server. Default: this machine's cores + 1 (see
   * {@link defaultDatabasePoolSize}).
   */
  readonly databasePoolSize: number;
  /** CUSTOS_KEY_PROVIDER=aws-kms: the KMS region, endpoint and credentials (docs/keys.md). */
  readonly kms:
    | {
        region: string;
        endpoint: string | undefined;
        accessKeyId: string;
        secretAccessKey: string;
        sessionToken: string | undefined;
      }
    | undefined;
}

/**
 * Connections per pool to the resource database: the cores of this machine plus one. More backends
 * than cores do not run more statements at once; they take turns, and each statement then costs
 * PostgreSQL more CPU (on the 2-core bench machine, 3 connections against node-postgres' default of 10:
 * PostgreSQL CPU per mixed search 1.03–1.07 against 1.23–1.44 ms, docs/bench.md). Sized for a database
 * on the same machine or one of similar size; set CUSTOS_DATABASE_POOL_SIZE for a larger server.
 */
export function defaultDatabasePoolSize(): number {
  return availableParallelism() + 1;
}

/** A configuration problem: the message names the variable and the reason, in one line. */
export class ConfigError extends Error {
  constructor(
    readonly variable: string,
    reason: string,
  ) {
    super(`${variable}: ${reason}`);
    this.name = 'ConfigError';
  }
}

type Env = Readonly<Record<string, string | undefined>>;

function str(env: Env, name: string): string | undefined {
  const v = env[name];
  return v === undefined || v.trim() === '' ? undefined : v.trim();
}

function oneOf<T extends string>(env: Env, name: string, allowed: readonly T[], dflt: T): T {
  const v = str(env, name);
  if (v === undefined) return dflt;
  if (!(allowed as readonly string[]).includes(v)) {
    throw new ConfigError(name, `must be one of ${allowed.join(', ')}`);
  }
  return v as T;
}

function postgresUrl(env: Env, name: string): string | undefined {
  const v = str(env, name);
  if (v === undefined) return undefined;
  let u: URL;
  try {
    u = new URL(v);
  } catch {
    throw new ConfigError(name, 'is not a URL (expected postgres://user@host:port/database)');
  }
  if (u.protocol !== 'postgres:' && u.protocol !== 'postgresql:') {
    throw new ConfigError(name, 'must start with postgres:// or postgresql://');
  }
  if (u.pathname.length <= 1) throw new ConfigError(name, 'must name a database');
  return v;
}

/** The default port of syslog over TLS (RFC 5425 §4.1). */
export const SYSLOG_TLS_PORT = 6514;

/** CUSTOS_SIEM_*: `syslog-tls://host[:port]` and the TLS files; all unset = forwarding off. */
function siemConfig(env: Env, cwd: string): Config['siem'] {
  const urlText = str(env, 'CUSTOS_SIEM_URL');
  const caFile = str(env, 'CUSTOS_SIEM_CA_FILE');
  const clientCertFile = str(env, 'CUSTOS_SIEM_CLIENT_CERT');
  const clientKeyFile = str(env, 'CUSTOS_SIEM_CLIENT_KEY');
  const retryText = str(env, 'CUSTOS_SIEM_RETRY_MAX');
  if (urlText === undefined) {
    const stray = [
      ['CUSTOS_SIEM_CA_FILE', caFile],
      ['CUSTOS_SIEM_CLIENT_CERT', clientCertFile],
      ['CUSTOS_SIEM_CLIENT_KEY', clientKeyFile],
      ['CUSTOS_SIEM_RETRY_MAX', retryText],
    ].find(([, v]) => v !== undefined);
    if (stray) throw new ConfigError(stray[0]!, 'is set but CUSTOS_SIEM_URL is not (forwarding is off)');
    return undefined;
  }
  const expected = 'expected syslog-tls://host:port (RFC 5425 syslog over TLS)';
  let u: URL;
  try {
    u = new URL(urlText);
  } catch {
    throw new ConfigError('CUSTOS_SIEM_URL', `is not a URL (${expected})`);
  }
  if (u.protocol !== 'syslog-tls:')
    throw new ConfigError(
      'CUSTOS_SIEM_URL',
      `must start with syslog-tls:// (${expected}; plain syslog is refused)`,
    );
  const host = u.hostname.replace(/^\[(.*)\]$/, '$1').toLowerCase();
  if (!host || u.username || u.password || (u.pathname && u.pathname !== '/') || u.search || u.hash)
    throw new ConfigError('CUSTOS_SIEM_URL', `must be a host and port only (${expected})`);
  const port = u.port === '' ? SYSLOG_TLS_PORT : Number(u.port);
  if (!Number.isInteger(port) || port < 1 || port > 65535)
    throw new ConfigError('CUSTOS_SIEM_URL', 'port must be from 1 to 65535');
  if ((clientCertFile === undefined) !== (clientKeyFile === undefined))
    throw new ConfigError(
      clientCertFile === undefined ? 'CUSTOS_SIEM_CLIENT_CERT' : 'CUSTOS_SIEM_CLIENT_KEY',
      'CUSTOS_SIEM_CLIENT_CERT and CUSTOS_SIEM_CLIENT_KEY must be set together',
    );
  const retry = retryText ?? '60';
  if (!/^\d{1,4}$/.test(retry) || Number(retry) < 1 || Number(retry) > 3600)
    throw new ConfigError('CUSTOS_SIEM_RETRY_MAX', 'must be a whole number of seconds from 1 to 3600');
  const file = (f: string | undefined) => (f === undefined ? undefined : path.resolve(cwd, f));
  return {
    host,
    port,
    caFile: file(caFile),
    clientCertFile: file(clientCertFile),
    clientKeyFile: file(clientKeyFile),
    retryMaxSeconds: Number(retry),
  };
}

/** The submission port with implicit TLS (RFC 8314 §3.3). */
export const SMTPS_PORT = 465;

/** CUSTOS_SMTP_*: `smtps://host[:port]`, the sender, credentials and CA; all unset = e-mail off. */
function smtpConfig(env: Env, cwd: string): Config['smtp'] {
  const urlText = str(env, 'CUSTOS_SMTP_URL');
  const from = str(env, 'CUSTOS_SMTP_FROM');
  const user = str(env, 'CUSTOS_SMTP_USER');
  const password = env.CUSTOS_SMTP_PASSWORD === '' ? undefined : env.CUSTOS_SMTP_PASSWORD;
  const caFile = str(env, 'CUSTOS_SMTP_CA_FILE');
  const domainsText = str(env, 'CUSTOS_SMTP_RECIPIENT_DOMAINS');
  if (urlText === undefined) {
    const stray = [
      ['CUSTOS_SMTP_RECIPIENT_DOMAINS', domainsText],
      ['CUSTOS_SMTP_FROM', from],
      ['CUSTOS_SMTP_USER', user],
      ['CUSTOS_SMTP_PASSWORD', password],
      ['CUSTOS_SMTP_CA_FILE', caFile],
    ].find(([, v]) => v !== undefined);
    if (stray) throw new ConfigError(stray[0]!, 'is set but CUSTOS_SMTP_URL is not (e-mail is off)');
    return undefined;
  }
  const expected = 'expected smtps://host:port, SMTP over implicit TLS (RFC 8314)';
  let u: URL;
  try {
    u = new URL(urlText);
  } catch {
    throw new ConfigError('CUSTOS_SMTP_URL', `is not a URL (${expected})`);
  }
  if (u.protocol !== 'smtps:')
    throw new ConfigError(
      'CUSTOS_SMTP_URL',
      `must start with smtps:// (${expected}; plain SMTP and STARTTLS are refused)`,
    );
  const host = u.hostname.replace(/^\[(.*)\]$/, '$1').toLowerCase();
  if (!host || u.username || u.password || (u.pathname && u.pathname !== '/') || u.search || u.hash)
    throw new ConfigError(
      'CUSTOS_SMTP_URL',
      `must be a host and port only (${expected}; credentials go in CUSTOS_SMTP_USER and CUSTOS_SMTP_PASSWORD)`,
    );
  const port = u.port === '' ? SMTPS_PORT : Number(u.port);
  if (!Number.isInteger(port) || port < 1 || port > 65535)
    throw new ConfigError('CUSTOS_SMTP_URL', 'port must be from 1 to 65535');
  if (from === undefined || !/^[^\s@<>(),;:"\\]{1,64}@[A-Za-z0-9.-]{1,253}$/.test(from))
    throw new ConfigError('CUSTOS_SMTP_FROM', 'must be the sender address, e.g. notifications@example.org');
  if ((user === undefined) !== (password === undefined))
    throw new ConfigError(
      user === undefined ? 'CUSTOS_SMTP_USER' : 'CUSTOS_SMTP_PASSWORD',
      'CUSTOS_SMTP_USER and CUSTOS_SMTP_PASSWORD must be set together',
    );
  const recipientDomains = (domainsText ?? '')
    .split(',')
    .map((d) => d.trim().toLowerCase().replace(/\.$/, ''))
    .filter(Boolean);
  for (const d of recipientDomains)
    if (
      !/^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$/.test(
        d,
      )
    )
      throw new ConfigError(
        'CUSTOS_SMTP_RECIPIENT_DOMAINS',
        'must be comma-separated domain names, e.g. example.org,clinic.example.org',
      );
  return {
    host,
    port,
    from,
    user,
    password,
    caFile: caFile === undefined ? undefined : path.resolve(cwd, caFile),
    recipientDomains: Object.freeze(recipientDomains),
  };
}

/**
 * CUSTOS_AUDIT_WITNESSES: comma-separated `<vkey>=<url>`. The vkey is checked here for its shape and
 * signature type (0x04, Ed25519 cosignature/v1); its key ID when the witness client is built
 * (audit/witness.ts). A vkey's base64 part is 44 characters without padding (33 bytes), so the first
 * `=` after it starts the URL.
 */
function witnessesConfig(env: Env, production: boolean): Config['auditWitnesses'] {
  const name = 'CUSTOS_AUDIT_WITNESSES';
  const text = str(env, name);
  if (text === undefined) return [];
  const out: { vkey: string; url: string }[] = [];
  for (const item of text
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)) {
    const m = /^([^\s+]+\+[0-9a-f]{8}\+([A-Za-z0-9+/]{44}))=(\S+)$/.exec(item);
    if (!m)
      throw new ConfigError(
        name,
        'each witness is <vkey>=<url>, the vkey being name+keyid+base64 (a C2SP note verifier key)',
      );
    const [, vkey, b64, urlText] = m as unknown as [string, string, string, string];
    if (Buffer.from(b64, 'base64')[0] !== 0x04)
      throw new ConfigError(
        name,
        `the key of ${vkey.split('+')[0]} is not an Ed25519 cosignature/v1 key (signature type 0x04)`,
      );
    let u: URL;
    try {
      u = new URL(urlText);
    } catch {
      throw new ConfigError(name, `the URL of witness ${vkey.split('+')[0]} is not a URL`);
    }
    if (u.protocol !== 'https:' && u.protocol !== 'http:')
      throw new ConfigError(name, 'witness URLs must be http(s) submission prefixes');
    if (u.username || u.password || u.search || u.hash)
      throw new ConfigError(name, 'witness URLs take no credentials, query or fragment');
    if (production && u.protocol !== 'https:')
      throw new ConfigError(name, 'production refuses plain-HTTP witness URLs: use https://');
    if (out.some((w) => w.vkey === vkey))
      throw new ConfigError(name, `witness ${vkey.split('+')[0]} is listed twice`);
    out.push({ vkey, url: u.href.replace(/\/+$/, '') });
  }
  return out;
}

/** The identity of a PostgreSQL database, ignoring credentials and options. */
export function databaseIdentity(url: string): string {
  const u = new URL(url);
  const host = u.hostname === 'localhost' ? '127.0.0.1' : u.hostname;
  return `${host}:${u.port || '5432'}${u.pathname}`;
}

export function loadConfig(env: Env = process.env, cwd = process.cwd()): Config {
  const mode = oneOf(env, 'CUSTOS_ENV', ['development', 'production'] as const, 'development');
  const dataDir = path.resolve(cwd, str(env, 'CUSTOS_DATA_DIR') ?? '.custos');
  const databaseUrl = postgresUrl(env, 'CUSTOS_DATABASE_URL');
  const auditDatabaseUrl = postgresUrl(env, 'CUSTOS_AUDIT_DATABASE_URL');
  const host = str(env, 'CUSTOS_HOST') ?? '127.0.0.1';
  const portText = str(env, 'CUSTOS_PORT') ?? '8080';
  if (!/^\d{1,5}$/.test(portText) || Number(portText) > 65535) {
    throw new ConfigError('CUSTOS_PORT', 'must be an integer from 0 to 65535');
  }
  const port = Number(portText);
  const publicUrlText =
    str(env, 'CUSTOS_PUBLIC_URL') ?? `http://${host === '0.0.0.0' ? '127.0.0.1' : host}:${port}`;
  let publicUrl: string;
  try {
    const u = new URL(publicUrlText);
    if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new Error('scheme');
    if (u.search || u.hash) throw new Error('query');
    publicUrl = u.href.replace(/\/$/, '');
  } catch {
    throw new ConfigError('CUSTOS_PUBLIC_URL', 'must be an absolute http(s) URL without query or fragment');
  }
  const cert = str(env, 'CUSTOS_TLS_CERT');
  const key = str(env, 'CUSTOS_TLS_KEY');
  if ((cert === undefined) !== (key === undefined)) {
    throw new ConfigError(
      cert === undefined ? 'CUSTOS_TLS_CERT' : 'CUSTOS_TLS_KEY',
      'CUSTOS_TLS_CERT and CUSTOS_TLS_KEY must be set together',
    );
  }
  const tls =
    cert && key ? { certFile: path.resolve(cwd, cert), keyFile: path.resolve(cwd, key) } : undefined;
  const proxiesText = str(env, 'CUSTOS_TRUSTED_PROXIES');
  const trustedProxies = proxiesText
    ? proxiesText
        .split(',')
        .map((s) => s.trim())
        .filter(Boolean)
    : [];
  for (const p of trustedProxies) {
    if (!/^[0-9a-fA-F:.]+(\/\d{1,3})?$/.test(p)) {
      throw new ConfigError(
        'CUSTOS_TRUSTED_PROXIES',
        'must be a comma-separated list of IP addresses or CIDR ranges',
      );
    }
  }
  const keyProvider = oneOf(env, 'CUSTOS_KEY_PROVIDER', ['local', 'pkcs11', 'aws-kms'] as const, 'local');
  const keyringPassphrase = str(env, 'CUSTOS_KEYRING_PASSPHRASE');
  const required = (name: string, why: string): string => {
    const v = str(env, name);
    if (!v) throw new ConfigError(name, `is required ${why}`);
    return v;
  };
  const pkcs11 =
    keyProvider === 'pkcs11'
      ? {
          module: required(
            'CUSTOS_PKCS11_MODULE',
            'with CUSTOS_KEY_PROVIDER=pkcs11 (the PKCS#11 library path)',
          ),
          tokenLabel: required('CUSTOS_PKCS11_TOKEN_LABEL', 'with CUSTOS_KEY_PROVIDER=pkcs11'),
          pin: required('CUSTOS_PKCS11_PIN', 'with CUSTOS_KEY_PROVIDER=pkcs11 (the user PIN)'),
        }
      : undefined;
  const kms =
    keyProvider === 'aws-kms'
      ? {
          region: required('CUSTOS_KMS_REGION', 'with CUSTOS_KEY_PROVIDER=aws-kms'),
          endpoint: str(env, 'CUSTOS_KMS_ENDPOINT'),
          accessKeyId: required('CUSTOS_KMS_ACCESS_KEY_ID', 'with CUSTOS_KEY_PROVIDER=aws-kms'),
          secretAccessKey: required('CUSTOS_KMS_SECRET_ACCESS_KEY', 'with CUSTOS_KEY_PROVIDER=aws-kms'),
          sessionToken: str(env, 'CUSTOS_KMS_SESSION_TOKEN'),
        }
      : undefined;
  const logLevel = oneOf(env, 'CUSTOS_LOG_LEVEL', ['debug', 'info', 'warn', 'error'] as const, 'info');
  const intervalText = str(env, 'CUSTOS_AUDIT_CHECKPOINT_INTERVAL') ?? '60';
  if (!/^\d{1,6}$/.test(intervalText)) {
    throw new ConfigError(
      'CUSTOS_AUDIT_CHECKPOINT_INTERVAL',
      'must be a whole number of seconds (0 turns scheduled checkpoints off)',
    );
  }
  const auditCheckpointIntervalSeconds = Number(intervalText);
  const checkpointDirText = str(env, 'CUSTOS_AUDIT_CHECKPOINT_DIR');
  const auditCheckpointDir = checkpointDirText ? path.resolve(cwd, checkpointDirText) : undefined;
  const retentionText = str(env, 'CUSTOS_AUDIT_RETENTION_YEARS') ?? '6';
  if (!/^\d{1,4}$/.test(retentionText) || Number(retentionText) < 6) {
    throw new ConfigError(
      'CUSTOS_AUDIT_RETENTION_YEARS',
      'must be a whole number of years, at least 6: audit records are kept six years (45 CFR 164.316(b)(2))',
    );
  }
  const auditRetentionYears = Number(retentionText);

  const siem = siemConfig(env, cwd);
  const smtp = smtpConfig(env, cwd);
  const auditWitnesses = witnessesConfig(env, mode === 'production');

  const searchIndexing = oneOf(env, 'CUSTOS_SEARCH_INDEXING', ['on', 'off'] as const, 'on') === 'on';
  const encryption = oneOf(env, 'CUSTOS_ENCRYPTION', ['on', 'off'] as const, 'on') === 'on';
  const protectContact = oneOf(env, 'CUSTOS_PROTECT_CONTACT', ['on', 'off'] as const, 'off') === 'on';
  const populationText = str(env, 'CUSTOS_BLIND_INDEX_POPULATION') ?? '1000000';
  if (!/^\d{1,12}$/.test(populationText) || Number(populationText) < 4)
    throw new ConfigError('CUSTOS_BLIND_INDEX_POPULATION', 'must be a whole number of rows, at least 4');
  const blindIndexPopulation = Number(populationText);
  const idleText = str(env, 'CUSTOS_SESSION_IDLE_MINUTES') ?? '15';
  if (!/^\d{1,4}$/.test(idleText) || Number(idleText) < 1 || Number(idleText) > 1440)
    throw new ConfigError('CUSTOS_SESSION_IDLE_MINUTES', 'must be a whole number of minutes from 1 to 1440');
  const sessionIdleMinutes = Number(idleText);
  const maxText = str(env, 'CUSTOS_SESSION_MAX_HOURS') ?? '8';
  if (!/^\d{1,3}$/.test(maxText) || Number(maxText) < 1 || Number(maxText) > 168)
    throw new ConfigError('CUSTOS_SESSION_MAX_HOURS', 'must be a whole number of hours from 1 to 168');
  const sessionMaxHours = Number(maxText);
  if (sessionIdleMinutes > sessionMaxHours * 60)
    throw new ConfigError('CUSTOS_SESSION_IDLE_MINUTES', 'must not exceed CUSTOS_SESSION_MAX_HOURS');

  const whole = (name: string, dflt: number, min: number, max: number, unit: string): number => {
    const text = str(env, name) ?? String(dflt);
    if (!/^\d{1,6}$/.test(text) || Number(text) < min || Number(text) > max)
      throw new ConfigError(name, `must be a whole number${unit} from ${min} to ${max}`);
    return Number(text);
  };
  const databasePoolSize = whole('CUSTOS_DATABASE_POOL_SIZE', defaultDatabasePoolSize(), 1, 100, '');
  const subscriptionDelivery = {
    maxAttempts: whole('CUSTOS_SUBSCRIPTION_MAX_ATTEMPTS', 8, 1, 100, ''),
    retryMaxSeconds: whole('CUSTOS_SUBSCRIPTION_RETRY_MAX', 600, 2, 86_400, ' of seconds'),
    timeoutSeconds: whole('CUSTOS_SUBSCRIPTION_TIMEOUT', 10, 1, 300, ' of seconds'),
  };

  if (
    databaseUrl &&
    auditDatabaseUrl &&
    databaseIdentity(databaseUrl) === databaseIdentity(auditDatabaseUrl)
  ) {
    throw new ConfigError(
      'CUSTOS_AUDIT_DATABASE_URL',
      'must not be the resource database (CUSTOS_DATABASE_URL)',
    );
  }
  if (mode === 'production') {
    if (!databaseUrl)
      throw new ConfigError(
        'CUSTOS_DATABASE_URL',
        'production refuses embedded storage: set a PostgreSQL URL',
      );
    if (!auditDatabaseUrl) {
      throw new ConfigError(
        'CUSTOS_AUDIT_DATABASE_URL',
        'production refuses the embedded audit database: set a PostgreSQL URL',
      );
    }
    if (keyProvider === 'local' && keyringPassphrase === undefined) {
      throw new ConfigError(
        'CUSTOS_KEYRING_PASSPHRASE',
        'production refuses the development keyring: set a passphrase or another key provider',
      );
    }
    if (!tls && trustedProxies.length === 0) {
      throw new ConfigError(
        'CUSTOS_TLS_CERT',
        'production refuses plaintext HTTP: set CUSTOS_TLS_CERT/KEY or CUSTOS_TRUSTED_PROXIES',
      );
    }
    if (!publicUrl.startsWith('https:')) {
      throw new ConfigError('CUSTOS_PUBLIC_URL', 'must be https:// in production');
    }
    if (!searchIndexing) {
      throw new ConfigError('CUSTOS_SEARCH_INDEXING', 'production refuses off: searches would miss new data');
    }
    if (!encryption) {
      throw new ConfigError(
        'CUSTOS_ENCRYPTION',
        'production refuses off: protected elements would be stored in clear',
      );
    }
  }
  return Object.freeze({
    env: mode,
    dataDir,
    databaseUrl,
    auditDatabaseUrl,
    host,
    port,
    publicUrl,
    tls: tls && Object.freeze(tls),
    trustedProxies: Object.freeze(trustedProxies),
    keyProvider,
    keyringPassphrase,
    logLevel,
    auditCheckpointIntervalSeconds,
    auditCheckpointDir,
    auditRetentionYears,
    auditWitnesses: Object.freeze(auditWitnesses.map((w) => Object.freeze(w))),
    searchIndexing,
    encryption,
    protectContact,
    blindIndexPopulation,
    sessionIdleMinutes,
    sessionMaxHours,
    pkcs11: pkcs11 && Object.freeze(pkcs11),
    kms: kms && Object.freeze(kms),
    siem: siem && Object.freeze(siem),
    smtp: smtp && Object.freeze(smtp),
    subscriptionDelivery: Object.freeze(subscriptionDelivery),
    databasePoolSize,
  });
}
