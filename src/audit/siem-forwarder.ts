import { X509Certificate, createPrivateKey } from 'node:crypto';
import type { TLSSocket } from 'node:tls';
import pg from 'pg';
import { ConfigError, type Config } from '../config/config.ts';
import { certificates, readPem } from '../config/pem-files.ts';
import { EgressGateway, egressConnectTls } from '../egress/egress.ts';
import { siemVendor } from '../egress/infrastructure.ts';
import { errorFields, type Logger } from '../log/logger.ts';
import { BREAK_GLASS_PURPOSES } from '../phi/purpose-of-use.ts';
import type { SqlDriver, SqlQueryable } from '../store/sql-driver.ts';
import type { AuditEvent } from './audit-event.ts';

/**
 * Forwarding the audit log to a SIEM: RFC 5424 syslog messages over TLS (RFC 5425), at least once,
 * from a durable cursor. docs/audit.md, "Forwarding to a SIEM", says what goes out and why.
 *
 * - One message per entry, in sequence order, built from an allowlist of identifier fields of the
 *   event (`formatSyslog`): never its sealed field, never anything not listed there.
 * - Framed by octet counting (RFC 5425 §4.3, RFC 6587 §3.4.1) on a TLS 1.2+ stream opened through
 *   the egress port, the server's certificate verified.
 * - The cursor (the next sequence number to forward) lives in the audit database, in the INSERT-only
 *   table `audit_siem_cursor` (one row per advance; the position is the largest row), which the
 *   INSERT/SELECT-only application role can keep. It advances only over entries that were written
 *   and flushed and whose connection then stayed up for the confirmation delay; on any error the
 *   forwarder reconnects and resends from the last confirmed position. Receivers dedupe by `seq`
 *   (and `part`).
 * - Asynchronous from the append: it polls the log, so a slow or absent SIEM never delays or fails a
 *   PHI request. On a PostgreSQL server it uses a connection of its own (not the append pool) that
 *   holds a session advisory lock: of several processes sharing one audit database, one forwards.
 */

/** Audit migration 6: the forwarding cursor, INSERT-only like the log. */
export const SIEM_CURSOR_MIGRATION_SQL = `
-- Where forwarding to each SIEM destination has reached (siem-forwarder.ts): one row per advance,
-- the position is the largest next_seq of the destination. INSERT-only, so that the application
-- role (INSERT and SELECT) can keep it.
CREATE TABLE audit_siem_cursor (
  destination text NOT NULL,
  next_seq bigint NOT NULL CHECK (next_seq >= 0),
  recorded_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (destination, next_seq)
);
CREATE TRIGGER audit_siem_cursor_no_update BEFORE UPDATE OR DELETE ON audit_siem_cursor
  FOR EACH ROW EXECUTE FUNCTION audit_entry_refuse_change();
CREATE TRIGGER audit_siem_cursor_no_truncate BEFORE TRUNCATE ON audit_siem_cursor
  FOR EACH STATEMENT EXECUTE FUNCTION audit_entry_refuse_change();
`;

/**
 * The SD-ID of our structured data element. RFC 5424 §7.2.2 wants `name@<private enterprise
 * number>`; Custos has none, so it uses 32473, the number IANA reserves for documentation (RFC 5612).
 */
export const SIEM_SD_ID = 'custos@32473';

/** RFC 5424 facility authpriv (10): security/authorization messages that should be kept private. */
export const SIEM_FACILITY = 10;

/**
 * Largest message sent (bytes, without the frame's length prefix): 2048, what RFC 5425 §4.3.1 says
 * every receiver must accept (8192 is only a "should", and rsyslog's default limit is 8096). An
 * event naming more patients than fit is sent as several messages with the same `seq` and
 * `part`/`parts`, each complete in itself.
 */
export const SIEM_MAX_MESSAGE_BYTES = 2048;

/** One stored audit entry, as read from `audit_entry`. */
export interface SiemEntry {
  seq: number;
  entry: Uint8Array;
  leafHash: Uint8Array;
}

/** RFC 5424 §6.2.1 severities by outcome; break-glass successes are notices. */
function severity(e: Partial<AuditEvent>): number {
  if (e.outcome === 'failed') return 3; // error
  if (e.outcome === 'refused') return 4; // warning
  if (e.purpose && BREAK_GLASS_PURPOSES.has(e.purpose)) return 5; // notice
  return 6; // informational
}

const TIMESTAMP = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$/;
const PRINTUSASCII = /^[\x21-\x7e]+$/;
const MAX_VALUE_CHARS = 256;
const PLAIN_VALUE = /^[\x20\x21\x23-\x5b\x5e-\x7e]*$/;

/** A header field (RFC 5424 §6.2): printable US-ASCII, at most `max` characters, else NILVALUE. */
function headerField(v: unknown, max: number): string {
  return typeof v === 'string' && v.length <= max && PRINTUSASCII.test(v) ? v : '-';
}

/**
 * A PARAM-VALUE (RFC 5424 §6.3.3): control characters replaced, cut to 256 characters, and `"`,
 * `\` and `]` escaped. Values are identifiers and codes; the cut and the replacement only keep a
 * malformed one from breaking the message.
 */
function paramValue(v: unknown): string {
  const text = String(v);
  // The usual case: printable ASCII without `"`, `\` or `]`, short enough (ids, codes, addresses).
  if (text.length <= MAX_VALUE_CHARS && PLAIN_VALUE.test(text)) return text;
  // eslint-disable-next-line no-control-regex
  const s = Array.from(text.replace(/[\u0000-\u001f\u007f-\u009f]/g, '?'))
    .slice(0, MAX_VALUE_CHARS)
    .join('');
  return s.replace(/["\\\]]/g, (c) => `\\${c}`);
}

function param(name: string, v: unknown): string {
  return v === undefined || v === null || v === '' ? '' : ` ${name}="${paramValue(v)}"`;
}

/**
 * The RFC 5424 message(s) for one audit entry. The fields that go out, and only these (an allowlist:
 * the event's `sealed` field and anything added to the event model later stay home):
 *
 * - PRI: facility authpriv (10); severity 3 error (outcome failed), 4 warning (refused), 5 notice
 *   (a break-glass purpose), 6 informational (anything else).
 * - TIMESTAMP: the event's `time`. HOSTNAME: `hostname` (the public URL's host: the log, not the
 *   process, that recorded it). APP-NAME `custos`. PROCID `-`. MSGID: the event's action.
 * - STRUCTURED-DATA `[custos@32473 …]`: `seq` (the entry's sequence number, the dedupe key), `leaf`
 *   (its Merkle leaf hash, hex: `custos audit prove --seq` proves it), `id` (event UUID), `phase`,
 *   `outcome`, `code`, `requestId`, `project`, `client`, `user`, `role` (repeated), `purpose`,
 *   `resourceType`, `resourceId`, `resourceVersion`, `count`, `srcIp` (the caller's address),
 *   `patient` (repeated: the patient ids the event names), and `part`/`parts` when split.
 * - MSG: `<action> <outcome>[ <type>[/<id>]]`, the same identifiers for a human reader.
 *
 * An entry that is not valid JSON (only a tampered log has one) goes out with `seq`, `leaf` and
 * `error="unreadable-entry"` so that the receiver sees the gap explained.
 */
export function formatSyslog(e: SiemEntry, hostname: string): Buffer[] {
  let ev: Partial<AuditEvent> | undefined;
  try {
    const parsed: unknown = JSON.parse(Buffer.from(e.entry).toString('utf8'));
    if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) ev = parsed as Partial<AuditEvent>;
  } catch {
    ev = undefined;
  }
  const leaf = Buffer.from(e.leafHash).toString('hex');
  const host = headerField(hostname, 255);
  if (!ev) {
    const sd = `[${SIEM_SD_ID}${param('seq', e.seq)}${param('leaf', leaf)}${param('error', 'unreadable-entry')}]`;
    return [Buffer.from(`<${SIEM_FACILITY * 8 + 3}>1 - ${host} custos - - ${sd}`, 'utf8')];
  }
  const pri = SIEM_FACILITY * 8 + severity(ev);
  const ts = typeof ev.time === 'string' && TIMESTAMP.test(ev.time) ? ev.time : '-';
  const header = `<${pri}>1 ${ts} ${host} custos - ${headerField(ev.action, 32)} `;
  const roles = Array.isArray(ev.actor?.roles) ? ev.actor.roles : [];
  const common =
    param('seq', e.seq) +
    param('leaf', leaf) +
    param('id', ev.id) +
    param('phase', ev.phase) +
    param('outcome', ev.outcome) +
    param('code', ev.code) +
    param('requestId', ev.requestId) +
    param('project', ev.projectId) +
    param('client', ev.actor?.clientId) +
    param('user', ev.actor?.userId) +
    roles.map((r) => param('role', r)).join('') +
    param('purpose', ev.purpose) +
    param('resourceType', ev.resource?.type) +
    param('resourceId', ev.resource?.id) +
    param('resourceVersion', ev.resource?.version) +
    param('count', typeof ev.count === 'number' ? ev.count : undefined) +
    param('srcIp', ev.source?.ip);
  const what = ev.resource?.type ? ` ${ev.resource.type}${ev.resource.id ? `/${ev.resource.id}` : ''}` : '';
  const msg = paramValue(`${ev.action ?? '-'} ${ev.outcome ?? '-'}${what}`);
  const patients = (Array.isArray(ev.patients) ? ev.patients : []).map((p) => param('patient', p));
  const build = (ps: string[], part?: [number, number]) =>
    Buffer.from(
      `${header}[${SIEM_SD_ID}${common}${ps.join('')}${part ? param('part', part[0]) + param('parts', part[1]) : ''}] ${msg}`,
      'utf8',
    );
  const whole = build(patients);
  if (whole.length <= SIEM_MAX_MESSAGE_BYTES || patients.length <= 1) return [whole];
  // Split the patients over parts; every part repeats the rest, so each stands alone.
  const room = SIEM_MAX_MESSAGE_BYTES - build([], [99999, 99999]).length;
  const chunks: string[][] = [];
  let chunk: string[] = [];
  let size = 0;
  for (const p of patients) {
    const n = Buffer.byteLength(p);
    if (chunk.length > 0 && size + n > room) {
      chunks.push(chunk);
      chunk = [];
      size = 0;
    }
    chunk.push(p);
    size += n;
  }
  chunks.push(chunk);
  return chunks.map((c, i) => build(c, [i + 1, chunks.length]));
}

/** RFC 5425 §4.3 / RFC 6587 §3.4.1 octet-counting frame: `MSG-LEN SP SYSLOG-MSG`. */
export function frameSyslog(message: Buffer): Buffer {
  return Buffer.concat([Buffer.from(`${message.length} `, 'ascii'), message]);
}

/** The PEM files of CUSTOS_SIEM_*, read and checked at start. */
export interface SiemTlsFiles {
  ca: Buffer | undefined;
  cert: Buffer | undefined;
  key: Buffer | undefined;
}

/**
 * Reads and checks the CA bundle and the client certificate and key named by CUSTOS_SIEM_*, so that
 * a wrong file stops the start with a ConfigError naming the variable (never at the first send).
 */
export function loadSiemTls(siem: NonNullable<Config['siem']>): SiemTlsFiles {
  let ca: Buffer | undefined;
  if (siem.caFile) {
    ca = readPem('CUSTOS_SIEM_CA_FILE', siem.caFile);
    certificates('CUSTOS_SIEM_CA_FILE', siem.caFile, ca);
  }
  let cert: Buffer | undefined;
  let key: Buffer | undefined;
  if (siem.clientCertFile && siem.clientKeyFile) {
    cert = readPem('CUSTOS_SIEM_CLIENT_CERT', siem.clientCertFile);
    certificates('CUSTOS_SIEM_CLIENT_CERT', siem.clientCertFile, cert);
    key = readPem('CUSTOS_SIEM_CLIENT_KEY', siem.clientKeyFile);
    let leaf: X509Certificate;
    try {
      leaf = new X509Certificate(cert);
      if (!leaf.checkPrivateKey(createPrivateKey(key))) throw new Error('mismatch');
    } catch {
      throw new ConfigError(
        'CUSTOS_SIEM_CLIENT_KEY',
        `${siem.clientKeyFile} is not an unencrypted PEM private key of the certificate in CUSTOS_SIEM_CLIENT_CERT`,
      );
    }
  }
  return { ca, cert, key };
}

export interface SiemForwarderOptions {
  /** The audit database (entries and cursor). Embedded: read directly, one process owns it. */
  db: SqlDriver;
  /**
   * With a PostgreSQL server: its URL (CUSTOS_AUDIT_DATABASE_URL). The forwarder opens one
   * connection of its own with it, off the append pool, and holds the leader lock on it.
   */
  databaseUrl?: string;
  host: string;
  port: number;
  tls: SiemTlsFiles;
  /** RFC 5424 HOSTNAME of every message. */
  hostname: string;
  log: Logger;
  /** Longest wait between reconnect attempts (exponential backoff from `retryMinMs`, with jitter). */
  retryMaxMs?: number;
  retryMinMs?: number;
  /** Entries per read and write. */
  batchSize?: number;
  /** Wait between polls of the log once everything is sent. */
  pollMs?: number;
  /** How long a connection must stay up after a batch was flushed before the batch counts as delivered. */
  confirmMs?: number;
  /** Least time between two cursor rows (the table grows by at most one row per this). */
  persistMs?: number;
  /** Period of the `audit.siem_lag` log line. */
  lagLogMs?: number;
  /** Retry period of a standby process (another one holds the leader lock). */
  standbyMs?: number;
  /** The egress gateway (default: one that knows only this SIEM, as infrastructure). */
  egress?: EgressGateway;
}

/** What the forwarder is doing (for tests and the lag line). */
export interface SiemStatus {
  destination: string;
  /** This process holds the leader lock (always true on embedded storage). */
  leader: boolean;
  connected: boolean;
  /** Next sequence number not yet confirmed delivered. */
  confirmed: number;
  /** Next sequence number not yet written to the connection. */
  sent: number;
  /** Position of the newest cursor row. */
  persisted: number;
  /** Code of the last connection or database error, until the next success. */
  lastError: string | undefined;
}

interface Session {
  db: SqlQueryable;
  lost: boolean;
  close(): Promise<void>;
}

class SiemFailure extends Error {
  constructor(
    readonly code: string,
    readonly database = false,
  ) {
    super(code);
  }
}

function errorCode(e: unknown): string {
  const code = (e as { code?: unknown } | null)?.code;
  return typeof code === 'string' && /^[A-Za-z0-9_.-]{1,64}$/.test(code)
    ? code
    : e instanceof Error
      ? e.name
      : 'unknown';
}

/**
 * Forwards the audit log to one SIEM. `start()` returns at once; `stop()` ends it, recording the
 * confirmed position. Never throws into its caller after `start`: every failure is logged
 * (`audit.siem_unavailable` with the error code) and retried with backoff.
 *
 * @example
 * const f = new SiemForwarder({ db: auditDb, host: 'siem.internal', port: 6514, tls, hostname, log });
 * f.start();
 * // …
 * await f.stop();
 */
export class SiemForwarder {
  readonly destination: string;
  private readonly o: Required<
    Pick<
      SiemForwarderOptions,
      | 'retryMaxMs'
      | 'retryMinMs'
      | 'batchSize'
      | 'pollMs'
      | 'confirmMs'
      | 'persistMs'
      | 'lagLogMs'
      | 'standbyMs'
    >
  >;
  private session: Session | undefined;
  private socket: TLSSocket | undefined;
  /** Why the socket died, once it has. */
  private socketDead: string | undefined;
  private confirmed = 0;
  private sent = 0;
  private persisted = 0;
  private pending: { upTo: number; at: number }[] = [];
  private lastPersistAt = 0;
  private lastLagLogAt = 0;
  private lastError: string | undefined;
  private connectedAt: number | undefined;
  private stopping = false;
  private loopDone: Promise<void> | undefined;
  private wake: (() => void) | undefined;
  private readonly abort = new AbortController();
  private readonly egress: EgressGateway;

  constructor(private readonly opts: SiemForwarderOptions) {
    this.egress = opts.egress ?? EgressGateway.of([siemVendor(opts.host, opts.port)], { log: opts.log });
    if (opts.db.kind === 'postgres' && !opts.databaseUrl)
      throw new Error('SiemForwarder: a PostgreSQL audit database needs databaseUrl');
    const host = opts.host.includes(':') ? `[${opts.host}]` : opts.host;
    this.destination = `syslog-tls://${host.toLowerCase()}:${opts.port}`;
    this.o = {
      retryMaxMs: opts.retryMaxMs ?? 60_000,
      retryMinMs: opts.retryMinMs ?? 1_000,
      batchSize: opts.batchSize ?? 256,
      pollMs: opts.pollMs ?? 500,
      confirmMs: opts.confirmMs ?? 2_000,
      persistMs: opts.persistMs ?? 5_000,
      lagLogMs: opts.lagLogMs ?? 60_000,
      standbyMs: opts.standbyMs ?? 5_000,
    };
  }

  start(): void {
    if (this.loopDone) return;
    // The loop handles its own failures; this only keeps a bug in it from crashing the server.
    this.loopDone = this.loop().catch((e) => this.opts.log.error('audit.siem_failed', errorFields(e)));
  }

  status(): SiemStatus {
    return {
      destination: this.destination,
      leader: this.session !== undefined && !this.session.lost,
      connected: this.socket !== undefined && this.socketDead === undefined,
      confirmed: this.confirmed,
      sent: this.sent,
      persisted: this.persisted,
      lastError: this.lastError,
    };
  }

  /** Stops forwarding and records the confirmed position; unconfirmed entries are resent next time. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.abort.abort();
    this.wake?.();
    const done = this.loopDone ?? Promise.resolve();
    // A write stuck on an unresponsive receiver: destroying the socket fails it at once.
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<'late'>((resolve) => (timer = setTimeout(() => resolve('late'), 2_000)));
    if ((await Promise.race([done, late])) === 'late') this.socket?.destroy();
    clearTimeout(timer);
    await done;
    if (this.session && !this.session.lost) {
      this.confirmDue();
      await this.persist(true).catch(() => {});
    }
    this.dropSocket();
    await this.session?.close().catch(() => {});
    this.session = undefined;
  }

  private sleep(ms: number): Promise<void> {
    if (this.stopping) return Promise.resolve();
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      function done() {
        clearTimeout(t);
        resolve();
      }
      this.wake = done;
    });
  }

  private async loop(): Promise<void> {
    let failures = 0;
    while (!this.stopping) {
      try {
        if (!this.session) {
          const s = await this.openSession();
          if (!s) {
            await this.sleep(this.o.standbyMs);
            continue;
          }
          this.session = s;
          this.persisted = await this.readCursor();
          this.confirmed = this.sent = this.persisted;
          this.pending = [];
          this.lastPersistAt = Date.now();
        }
        if (!this.socket) {
          await this.connect();
          this.lastError = undefined;
        }
        const moved = await this.pump();
        this.confirmDue();
        await this.persist(false);
        await this.logLag(false);
        if (moved === 0 && !this.stopping) await this.sleep(this.o.pollMs);
      } catch (e) {
        if (this.stopping) break;
        // The backoff starts over only after a connection that lasted: a receiver that accepts and
        // then drops every connection (a refused client certificate) still backs off.
        if (this.connectedAt !== undefined && Date.now() - this.connectedAt >= this.o.confirmMs) failures = 0;
        this.connectedAt = undefined;
        failures++;
        const f = e instanceof SiemFailure ? e : new SiemFailure(errorCode(e), this.session?.lost === true);
        this.lastError = f.code;
        this.dropSocket();
        if (f.database || this.session?.lost) {
          await this.session?.close().catch(() => {});
          this.session = undefined;
        }
        const ceiling = Math.min(this.o.retryMaxMs, this.o.retryMinMs * 2 ** Math.min(failures - 1, 20));
        const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
        this.opts.log.warn('audit.siem_unavailable', {
          code: f.code,
          host: this.opts.host,
          port: this.opts.port,
          durationMs: delay,
          seq: this.confirmed,
        });
        if (this.session && !this.session.lost) await this.logLag(false).catch(() => {});
        await this.sleep(delay);
      }
    }
  }

  /** The connection the forwarder reads and records its cursor on; undefined when another process leads. */
  private async openSession(): Promise<Session | undefined> {
    if (this.opts.db.kind === 'embedded') {
      return { db: this.opts.db, lost: false, close: async () => {} };
    }
    const client = new pg.Client({
      connectionString: this.opts.databaseUrl,
      keepAlive: true,
      connectionTimeoutMillis: 10_000,
      application_name: 'custos-siem-forwarder',
    });
    const session: Session = {
      db: {
        query: async <R>(sql: string, params: readonly unknown[] = []) => {
          try {
            return { rows: (await client.query(sql, params as unknown[])).rows as R[] };
          } catch (e) {
            throw new SiemFailure(errorCode(e), true);
          }
        },
      },
      lost: false,
      close: async () => {
        await client.end();
      },
    };
    client.on('error', () => (session.lost = true));
    client.on('end', () => (session.lost = true));
    try {
      await client.connect();
      // A session lock: held while this connection lives, released if the process or the connection
      // dies, so that another process takes over.
      const r = await client.query<{ ok: boolean }>(
        'SELECT pg_try_advisory_lock(hashtextextended($1, 0)) AS ok',
        [`custos-siem-forwarder ${this.destination}`],
      );
      if (r.rows[0]?.ok === true) return session;
      this.opts.log.debug('audit.siem_standby', { host: this.opts.host, port: this.opts.port });
    } catch (e) {
      await client.end().catch(() => {});
      throw new SiemFailure(errorCode(e), true);
    }
    await client.end().catch(() => {});
    return undefined;
  }

  private async readCursor(): Promise<number> {
    const r = await this.session!.db.query<{ next_seq: number | string | null }>(
      'SELECT max(next_seq) AS next_seq FROM audit_siem_cursor WHERE destination = $1',
      [this.destination],
    );
    return Number(r.rows[0]?.next_seq ?? 0);
  }

  private async connect(): Promise<void> {
    const socket = await egressConnectTls(this.egress, {
      purpose: 'audit-siem',
      // Audit events: records named by ids Custos assigned, PHI-bearing fields sealed (ADR 0009).
      dataClass: 'deidentified',
      host: this.opts.host,
      port: this.opts.port,
      ca: this.opts.tls.ca,
      cert: this.opts.tls.cert,
      key: this.opts.tls.key,
      signal: this.abort.signal,
    });
    this.socketDead = undefined;
    this.connectedAt = Date.now();
    socket.setKeepAlive(true, 30_000);
    socket.on('error', (e) => (this.socketDead ??= errorCode(e)));
    // The receiver sends nothing; reading is how its close (TLS close_notify, FIN) is noticed.
    socket.on('data', () => {});
    socket.on('end', () => (this.socketDead ??= 'ECONNCLOSED'));
    socket.on('close', () => (this.socketDead ??= 'ECONNCLOSED'));
    this.socket = socket;
    this.opts.log.info('audit.siem_connected', {
      host: this.opts.host,
      port: this.opts.port,
      seq: this.confirmed,
      count: Math.max(0, (await this.head()) - this.confirmed),
    });
  }

  private dropSocket(): void {
    if (this.socket) {
      this.socket.destroy();
      this.socket = undefined;
    }
    // Whatever was not confirmed is resent on the next connection.
    this.sent = this.confirmed;
    this.pending = [];
  }

  private checkSocket(): TLSSocket {
    if (!this.socket || this.socketDead) throw new SiemFailure(this.socketDead ?? 'ENOTCONN');
    return this.socket;
  }

  /** Reads the next batch after `sent` and writes it; resolves with the number of entries sent. */
  private async pump(): Promise<number> {
    this.checkSocket();
    const r = await this.session!.db.query<{
      seq: number | string;
      entry: Uint8Array;
      leaf_hash: Uint8Array;
    }>('SELECT seq, entry, leaf_hash FROM audit_entry WHERE seq >= $1 ORDER BY seq LIMIT $2', [
      this.sent,
      this.o.batchSize,
    ]);
    if (r.rows.length === 0) return 0;
    const frames: Buffer[] = [];
    for (const row of r.rows) {
      for (const m of formatSyslog(
        { seq: Number(row.seq), entry: row.entry, leafHash: row.leaf_hash },
        this.opts.hostname,
      ))
        frames.push(frameSyslog(m));
    }
    const socket = this.checkSocket();
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new SiemFailure('ETIMEDOUT')), 30_000);
      socket.write(Buffer.concat(frames), (e) => {
        clearTimeout(timer);
        if (e) reject(new SiemFailure(errorCode(e)));
        else resolve();
      });
    });
    this.sent = Number(r.rows[r.rows.length - 1]!.seq) + 1;
    this.pending.push({ upTo: this.sent, at: Date.now() });
    return r.rows.length;
  }

  /**
   * Batches count as delivered once the connection has stayed up `confirmMs` after they were flushed:
   * RFC 5425 has no acknowledgements, and a receiver that stopped or crashed closes or resets the
   * connection well within that time, which sends the forwarder back to the last confirmed position.
   */
  private confirmDue(): void {
    if (!this.socket || this.socketDead || this.socket.writableLength > 0) return;
    const now = Date.now();
    while (this.pending.length > 0 && now - this.pending[0]!.at >= this.o.confirmMs)
      this.confirmed = this.pending.shift()!.upTo;
  }

  /** Records the confirmed position: at most one row per `persistMs`, or now when `force`. */
  private async persist(force: boolean): Promise<void> {
    if (this.confirmed <= this.persisted) return;
    if (!force && Date.now() - this.lastPersistAt < this.o.persistMs) return;
    const at = this.confirmed;
    await this.session!.db.query(
      'INSERT INTO audit_siem_cursor (destination, next_seq) VALUES ($1, $2) ON CONFLICT DO NOTHING',
      [this.destination, at],
    );
    this.persisted = at;
    this.lastPersistAt = Date.now();
  }

  private async head(): Promise<number> {
    const r = await this.session!.db.query<{ size: number | string }>(
      'SELECT coalesce(max(seq) + 1, 0) AS size FROM audit_entry',
    );
    return Number(r.rows[0]?.size ?? 0);
  }

  /** `audit.siem_lag`: entries not yet confirmed delivered, and the age of the oldest of them. */
  private async logLag(force: boolean): Promise<void> {
    const now = Date.now();
    if (!force && now - this.lastLagLogAt < this.o.lagLogMs) return;
    this.lastLagLogAt = now;
    const lag = Math.max(0, (await this.head()) - this.confirmed);
    let durationMs = 0;
    if (lag > 0) {
      const r = await this.session!.db.query<{ entry: Uint8Array }>(
        'SELECT entry FROM audit_entry WHERE seq >= $1 ORDER BY seq LIMIT 1',
        [this.confirmed],
      );
      const time = r.rows[0] ? Date.parse(parseTime(r.rows[0].entry)) : NaN;
      durationMs = Number.isFinite(time) ? Math.max(0, now - time) : 0;
    }
    this.opts.log.info('audit.siem_lag', {
      host: this.opts.host,
      port: this.opts.port,
      seq: this.confirmed,
      count: lag,
      durationMs,
    });
  }
}

function parseTime(entry: Uint8Array): string {
  try {
    const t = (JSON.parse(Buffer.from(entry).toString('utf8')) as { time?: unknown }).time;
    return typeof t === 'string' ? t : '';
  } catch {
    return '';
  }
}
