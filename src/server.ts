import { servingGateway } from './phi/serving-gateway.ts';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import type { Config } from './config/config.ts';
import { errorFields, type Logger } from './log/logger.ts';
import { CustosError } from './kernel/errors.ts';
import type { SqlDriver } from './store/sql-driver.ts';
import { PgliteDriver } from './store/pglite/pglite-driver.ts';
import { PgDriver } from './store/pg/pg-driver.ts';
import { migrate, RESOURCE_MIGRATIONS } from './store/migrations.ts';
import { PlannerStatistics, type PlannerStatisticsOptions } from './store/planner-statistics.ts';
import { prepareAuditSchema } from './audit/audit-migrations.ts';
import { AuditLog } from './audit/audit-log.ts';
import { Checkpoints } from './audit/checkpoints.ts';
import { Witnesses } from './audit/witness.ts';
import { AuditSealer } from './audit/audit-sealer.ts';
import type { AuditQueryDeps } from './audit/audit-query.ts';
import { AuditReports } from './audit/audit-report.ts';
import { loadSiemTls, SiemForwarder } from './audit/siem-forwarder.ts';
import { ClientRegistry } from './auth/client-registry.ts';
import { UserService } from './auth/users.ts';
import { SessionStore } from './auth/sessions.ts';
import { TotpSealer } from './auth/totp.ts';
import { createAccessTokenVerifier } from './auth/access-token.ts';
import { createAuthenticator } from './auth/authenticate.ts';
import { initValidator } from './fhir/validator.ts';
import { RESOURCE_TYPES } from './fhir/resource-types.ts';
import { capabilityStatement, smartConfiguration } from './fhir/capability-statement.ts';
import { createHttpApp } from './http/http-app.ts';
import { AdminService } from './admin/admin-service.ts';
import { registerAdminRoutes } from './admin/admin-routes.ts';
import { readOrCreateKeyFile } from './kernel/key-file.ts';
import { newId } from './kernel/ids.ts';
import { EgressGateway } from './egress/egress.ts';
import { VendorRegistry } from './egress/vendor-registry.ts';
import { infrastructureVendors } from './egress/infrastructure.ts';
import { collectFlowMap, type FlowMap, type SubscriptionFlow } from './egress/flow-map.ts';
import { loadSmtpCa, startSubscriptionWorker } from './subscriptions/subscription-service.ts';
import type { SubscriptionWorker, SubscriptionWorkerOptions } from './subscriptions/subscription-worker.ts';

import { reindex, type ReindexResult } from './phi/reindex.ts';
import type { KeyAdminDeps } from './phi/key-admin.ts';
import { searchParameters } from './fhir/search-parameters.ts';
import { Envelope, planBlindBits } from './crypto/envelope.ts';
import type { KeyProvider } from './crypto/key-provider.ts';
import { openLocalKeyring } from './crypto/local-keyring.ts';
import { defaultPolicy, type PolicyRule } from './crypto/protection-policy.ts';

export const VERSION = '0.1.0';

/** Files under the data directory. Keys live here, never in a database (DESIGN.md rule 5). */
export function dataPaths(dataDir: string) {
  return {
    resources: path.join(dataDir, 'resources'),
    audit: path.join(dataDir, 'audit'),
    clientSecretKey: path.join(dataDir, 'keys', 'client-secret.key'),
    tokenSigningKeys: path.join(dataDir, 'keys', 'token-signing.jwks.json'),
    /** Keys of the authorization server's signed cookies and the login form's CSRF tokens. */
    oauthCookieKeys: path.join(dataDir, 'keys', 'oauth-cookie.keys.json'),
    auditCheckpointKey: path.join(dataDir, 'keys', 'audit-checkpoint.skey'),
    /** AES-256-GCM key of the sealed fields of audit events (audit-sealer.ts). */
    auditFieldKey: path.join(dataDir, 'keys', 'audit-field.key'),
    /** AES-256-GCM key sealing users' TOTP secrets (src/auth/totp.ts). */
    totpKey: path.join(dataDir, 'keys', 'totp-secret.key'),
    keyring: path.join(dataDir, 'keys', 'keyring.json'),
    devKeyringPassphrase: path.join(dataDir, 'keys', 'dev-keyring-passphrase'),
    adminToken: path.join(dataDir, 'admin-token'),
    serverInfo: path.join(dataDir, 'server.json'),
  };
}

/** The opened storage and services, without HTTP: what the CLI uses when no server runs. */
export interface CustosCore {
  resourceDb: SqlDriver;
  auditDb: SqlDriver;
  audit: AuditLog;
  checkpoints: Checkpoints;
  /** Checkpoint witnesses (CUSTOS_AUDIT_WITNESSES; none configured: an empty list): docs/audit.md. */
  witnesses: Witnesses;
  clients: ClientRegistry;
  /** People: users, passwords, MFA, lockout, login (docs/users.md). */
  users: UserService;
  /** Login sessions of people (idle timeout and absolute lifetime). */
  sessions: SessionStore;
  admin: AdminService;
  /** Field-level encryption (undefined when CUSTOS_ENCRYPTION=off). */
  encryption: { envelope: Envelope; policy: readonly PolicyRule[] } | undefined;
  /** Key administration (undefined when encryption is off): rotate, rewrap, destroy under dual control. */
  keys: KeyAdminDeps | undefined;
  /** `custos reindex`: rebuilds stale search indexes (all of them with `all`); resumable. */
  reindex(opts: { all?: boolean; batch?: number; requestId?: string }): Promise<ReindexResult>;
  /** The audit log as AuditEvent resources (GET /fhir/R4/AuditEvent), and its reports (docs/audit.md). */
  auditQuery: AuditQueryDeps;
  reports: AuditReports;
  /** The vendor registry: registered vendors and the configured infrastructure (docs/phi-boundary.md). */
  vendors: VendorRegistry;
  /** The egress gateway: every outbound connection (ADR 0009). */
  egress: EgressGateway;
  /** The PHI flow map of this configuration (`custos flows`, docs/phi-boundary.md). */
  flows(): Promise<FlowMap>;
  /**
   * The active subscriptions the flow map shows per vendor: the serving process's worker sets it
   * (startServer); undefined otherwise (the CLI with the storage opened directly).
   */
  subscriptionFlows: () => readonly SubscriptionFlow[] | undefined;
  close(): Promise<void>;
}

/**
 * The key provider and envelope encryption. The local keyring lives in `<data dir>/keys/keyring.json`
 * under CUSTOS_KEYRING_PASSPHRASE, or in development under a generated passphrase kept in
 * `<data dir>/keys/dev-keyring-passphrase` (production refuses that, see config.ts). Every unwrap
 * of a key from the provider is an audit event (the key access log).
 */
async function openEncryption(
  config: Config,
  paths: ReturnType<typeof dataPaths>,
  db: SqlDriver,
  audit: AuditLog,
  egress: EgressGateway,
): Promise<{ envelope: Envelope; policy: readonly PolicyRule[] }> {
  let provider: KeyProvider;
  if (config.pkcs11) {
    const { openPkcs11Provider } = await import('./crypto/pkcs11-provider.ts');
    provider = await openPkcs11Provider(config.pkcs11);
  } else if (config.kms) {
    const { openAwsKmsProvider } = await import('./crypto/aws-kms-provider.ts');
    provider = await openAwsKmsProvider({
      region: config.kms.region,
      endpoint: config.kms.endpoint,
      egress,
      credentials: {
        accessKeyId: config.kms.accessKeyId,
        secretAccessKey: config.kms.secretAccessKey,
        sessionToken: config.kms.sessionToken,
      },
    });
  } else {
    const dev = config.keyringPassphrase === undefined;
    const passphrase =
      config.keyringPassphrase ??
      readOrCreateKeyFile(paths.devKeyringPassphrase, () => randomBytes(32).toString('base64url'));
    provider = await openLocalKeyring(paths.keyring, passphrase, {
      create: true,
      // The generated development passphrase is random (256 bits): a cheaper KDF loses nothing.
      scryptLog2N: dev ? 15 : 17,
    });
  }
  const envelope = new Envelope({
    db,
    provider,
    blindBits: planBlindBits(config.blindIndexPopulation),
    onUnwrap: async ({ projectId, epoch, kind }) => {
      await audit.append({
        v: 1,
        id: newId(),
        time: new Date().toISOString(),
        phase: 'access',
        action: 'key',
        outcome: 'success',
        code: kind === 'data' ? 'key.unwrap_data' : 'key.unwrap_blind',
        requestId: newId(),
        projectId,
        actor: { roles: ['custos'] },
        resource: { type: 'DataKey', id: `${kind}-${epoch}` },
        source: {},
      });
    },
  });
  return { envelope, policy: defaultPolicy({ contact: config.protectContact }) };
}

/** Opens both databases (migrating them) and the services on top. */
export async function openCore(config: Config, log: Logger): Promise<CustosCore> {
  fs.mkdirSync(config.dataDir, { recursive: true, mode: 0o700 });
  const paths = dataPaths(config.dataDir);
  // Before any database is opened: a key file with loose permissions stops the start here.
  const sealer = AuditSealer.fromKeyFile(paths.auditFieldKey);
  const totpSealer = TotpSealer.fromKeyFile(paths.totpKey);
  const resourceDb = config.databaseUrl
    ? await PgDriver.open(config.databaseUrl, { max: config.databasePoolSize })
    : await PgliteDriver.open(paths.resources);
  let auditDb: SqlDriver;
  try {
    auditDb = config.auditDatabaseUrl
      ? await PgDriver.open(config.auditDatabaseUrl, { max: 4 })
      : await PgliteDriver.open(paths.audit);
  } catch (e) {
    await resourceDb.close();
    throw e;
  }
  try {
    await migrate(resourceDb, RESOURCE_MIGRATIONS, 'custos_migration', log);
    // Embedded: migrated. A server: migrated only in development by a role that owns the audit
    // schema; otherwise an older schema stops the start, naming `custos audit setup` (ADR 0006).
    await prepareAuditSchema(auditDb, { production: config.env === 'production', log });
  } catch (e) {
    await resourceDb.close().catch(() => {});
    await auditDb.close().catch(() => {});
    throw e;
  }
  const audit = new AuditLog(auditDb, { sealer });
  // Vendors: registered ones (resource database) and what the environment configures (ADR 0009).
  const vendors = new VendorRegistry({
    db: resourceDb,
    audit,
    infrastructure: infrastructureVendors(config),
    log,
  });
  const egress = new EgressGateway({
    destinations: vendors,
    audit,
    log,
    onAllowed: (d) => vendors.warnOne(d),
  });
  // The checkpoint origin names this log: the public host plus a fixed path (C2SP tlog-checkpoint).
  const checkpoints = new Checkpoints({
    audit,
    keyFile: paths.auditCheckpointKey,
    origin: `${new URL(config.publicUrl).host}/custos/audit`,
    exportDir: config.auditCheckpointDir,
  });
  let witnesses: Witnesses;
  try {
    witnesses = new Witnesses({
      audit,
      checkpoints,
      witnesses: config.auditWitnesses,
      exportDir: config.auditCheckpointDir,
      log,
      egress,
    });
  } catch (e) {
    await resourceDb.close().catch(() => {});
    await auditDb.close().catch(() => {});
    throw e;
  }
  const clients = new ClientRegistry({ db: resourceDb, keyFile: paths.clientSecretKey });
  const admin = new AdminService({
    db: resourceDb,
    clients,
    audit,
    publicUrl: config.publicUrl,
    tokenSigningKeyFile: paths.tokenSigningKeys,
  });
  const sessions = new SessionStore({
    db: resourceDb,
    audit,
    idleMinutes: config.sessionIdleMinutes,
    maxHours: config.sessionMaxHours,
  });
  const users = new UserService({ db: resourceDb, audit, sessions, totp: totpSealer });
  const auditQuery: AuditQueryDeps = {
    audit,
    fhirBaseUrl: `${config.publicUrl}/fhir/R4`,
    clientName: async (id) => (await clients.find(id))?.name,
    log,
  };
  let encryption: CustosCore['encryption'];
  if (config.encryption) {
    try {
      encryption = await openEncryption(config, paths, resourceDb, audit, egress);
    } catch (e) {
      await resourceDb.close().catch(() => {});
      await auditDb.close().catch(() => {});
      throw e;
    }
  }
  const core: CustosCore = {
    resourceDb,
    auditDb,
    audit,
    checkpoints,
    witnesses,
    clients,
    users,
    sessions,
    admin,
    encryption,
    keys: encryption && { db: resourceDb, audit, envelope: encryption.envelope },
    reindex: (opts) =>
      reindex({ db: resourceDb, audit, baseUrl: `${config.publicUrl}/fhir/R4`, encryption }, opts),
    auditQuery,
    reports: new AuditReports(auditQuery),
    vendors,
    egress,
    subscriptionFlows: () => undefined,
    flows() {
      return collectFlowMap({
        config,
        vendors,
        db: resourceDb,
        subscriptions: () => core.subscriptionFlows(),
      });
    },
    async close() {
      await witnesses.close();
      await egress.close();
      await encryption?.envelope.provider.close().catch(() => {});
      await resourceDb.close().catch(() => {});
      await auditDb.close().catch(() => {});
    },
  };
  return core;
}

export interface RunningServer {
  core: CustosCore;
  app: FastifyInstance;
  /** Forwarding of the audit log to a SIEM (CUSTOS_SIEM_URL), when configured. */
  siem: SiemForwarder | undefined;
  /** The statistics keepers of the resource and audit databases, where they need one. */
  statistics: (PlannerStatistics | undefined)[];
  /** FHIR rest-hook subscriptions: change feed and delivery (docs/phi-boundary.md, "Subscriptions"). */
  subscriptions: SubscriptionWorker;
  /** The URL the server listens on (port resolved). */
  url: string;
  close(): Promise<void>;
}

/** Builds the HTTP application over an opened core. */
export async function buildApp(
  config: Config,
  log: Logger,
  core: CustosCore,
  adminToken: string,
): Promise<FastifyInstance> {
  const paths = dataPaths(config.dataDir);
  initValidator(); // loads the definitions now (~1 s), not on the first write
  searchParameters(); // the same for the ~1,400 search parameter expressions
  const gateway = servingGateway(config, log, core);
  // Loaded here, not at the top: CLI commands that do not serve need no authorization server
  // (and oidc-provider prints a runtime notice on Node 20 when it loads; see docs/adr/0002).
  const { createAuthorizationServer } = await import('./auth/authorization-server.ts');
  const authServer = await createAuthorizationServer({
    issuer: config.publicUrl,
    db: core.resourceDb,
    clients: core.clients,
    signingKeyFile: paths.tokenSigningKeys,
    log,
    users: core.users,
    sessions: core.sessions,
    audit: core.audit,
    cookieKeyFile: paths.oauthCookieKeys,
    trustedProxies: config.trustedProxies,
    // The patient picker of a standalone launch: existence only, never content (docs/users.md).
    patientExists: async (projectId, id) =>
      (
        await core.resourceDb.query(
          `SELECT 1 FROM resource WHERE project_id = $1 AND resource_type = 'Patient' AND id = $2 AND NOT deleted`,
          [projectId, id],
        )
      ).rows.length > 0,
  });
  const verify = createAccessTokenVerifier({ issuer: config.publicUrl, jwks: () => authServer.jwks() });
  const authenticate = createAuthenticator({ verify, clients: core.clients, users: core.users });
  return createHttpApp({
    config,
    log,
    gateway,
    authenticate,
    oauthHandler: authServer.handler,
    capabilityStatement: () =>
      capabilityStatement({ publicUrl: config.publicUrl, resourceTypes: RESOURCE_TYPES, version: VERSION }),
    smartConfiguration: () => smartConfiguration(config.publicUrl),
    registerAdmin: (app) => registerAdminRoutes(app, core.admin, adminToken, core),
    auditQuery: core.auditQuery,
  });
}

/** `custos serve`: opens storage, writes the admin token and server.json, listens. */
export async function startServer(
  config: Config,
  log: Logger,
  opts: {
    subscriptions?: Partial<SubscriptionWorkerOptions>;
    /** Tests shorten the interval of the statistics keeper. */
    plannerStatistics?: PlannerStatisticsOptions;
  } = {},
): Promise<RunningServer> {
  const paths = dataPaths(config.dataDir);
  const other = runningServer(config.dataDir);
  if (other && other.pid !== process.pid) {
    // Embedded PGlite must be opened by one process only; a second server would corrupt it.
    throw new CustosError('CONFIG_INVALID', [
      {
        severity: 'error',
        code: 'conflict',
        diagnostics: `Another Custos server (pid ${other.pid}) is using this data directory.`,
      },
    ]);
  }
  // Before storage is opened: a CA bundle or client key that does not load stops the start here.
  const siemTls = config.siem && loadSiemTls(config.siem);
  const smtpCa = config.smtp && loadSmtpCa(config.smtp);
  const core = await openCore(config, log);
  try {
    const adminToken = readOrCreateKeyFile(paths.adminToken, () =>
      randomBytes(32).toString('base64url'),
    ).trim();
    const app = await buildApp(config, log, core, adminToken);
    await app.listen({ host: config.host, port: config.port });
    const addr = app.server.address();
    const port = typeof addr === 'object' && addr ? addr.port : config.port;
    const scheme = config.tls ? 'https' : 'http';
    const url = `${scheme}://${config.host.includes(':') ? `[${config.host}]` : config.host}:${port}`;
    fs.writeFileSync(paths.serverInfo, JSON.stringify({ pid: process.pid, url }), { mode: 0o600 });
    const stopCheckpoints = scheduleCheckpoints(core, config.auditCheckpointIntervalSeconds, log);
    // Where no autovacuum analyzes our tables (PGlite; a server with it off), Custos does, so that
    // plans stay right as data grows (src/store/planner-statistics.ts).
    const statistics = [
      await PlannerStatistics.start(core.resourceDb, 'resources', log, opts.plannerStatistics),
      await PlannerStatistics.start(core.auditDb, 'audit', log, opts.plannerStatistics),
    ];
    // Asynchronous from the appends: a slow or absent SIEM never delays a request (docs/audit.md).
    const siem =
      config.siem && siemTls
        ? new SiemForwarder({
            db: core.auditDb,
            databaseUrl: config.auditDatabaseUrl,
            host: config.siem.host,
            port: config.siem.port,
            tls: siemTls,
            hostname: new URL(config.publicUrl).hostname.replace(/^\[(.*)\]$/, '$1'),
            log,
            retryMaxMs: config.siem.retryMaxSeconds * 1000,
            egress: core.egress,
          })
        : undefined;
    siem?.start();
    // Vendor BAAs expiring within 30 days, or expired: a warning now and daily (docs/phi-boundary.md).
    const warnVendors = () => void core.vendors.warnExpiring().catch(() => {});
    warnVendors();
    const vendorTimer = setInterval(warnVendors, 86_400_000);
    vendorTimer.unref();
    // FHIR rest-hook subscriptions, delivered through the egress gateway; stopped before storage closes.
    const subscriptions = startSubscriptionWorker(config, log, core, opts.subscriptions, smtpCa);
    core.subscriptionFlows = () => subscriptions.activeFlows();
    log.info('server.listening', {
      host: config.host,
      port,
      storage: config.databaseUrl ? 'postgres' : 'embedded',
    });
    return {
      core,
      app,
      statistics,
      siem,
      subscriptions,
      url,
      async close() {
        try {
          const info = JSON.parse(fs.readFileSync(paths.serverInfo, 'utf8')) as { pid?: number };
          if (info.pid === process.pid) fs.rmSync(paths.serverInfo, { force: true });
        } catch {
          /* already gone */
        }
        stopCheckpoints();
        clearInterval(vendorTimer);
        await Promise.all(statistics.map((s) => s?.stop()));
        await siem?.stop();
        await subscriptions.stop();
        await app.close();
        await core.close();
      },
    };
  } catch (e) {
    await core.close();
    throw e;
  }
}

/**
 * Signs a checkpoint every `seconds` while the log grows: the published maximum merge delay within
 * which every audit entry is covered by a signed checkpoint. Each interval the newest checkpoint also
 * goes to the witnesses that have not cosigned it (witness.ts). Returns the stop function.
 */
function scheduleCheckpoints(core: CustosCore, seconds: number, log: Logger): () => void {
  if (seconds <= 0) return () => {};
  let signedSize = -1;
  let running = false;
  const timer = setInterval(() => {
    if (running) return;
    running = true;
    void (async () => {
      try {
        const size = await core.audit.size();
        if (size !== signedSize) signedSize = (await core.checkpoints.checkpoint()).treeSize;
      } catch (e) {
        log.error('audit.checkpoint_failed', errorFields(e));
      } finally {
        running = false;
      }
      // Then to the witnesses, in the background: a slow or absent witness delays neither the next
      // checkpoint nor any request; one that failed is retried at the next interval.
      void core.witnesses.tick();
    })();
  }, seconds * 1000);
  timer.unref();
  return () => clearInterval(timer);
}

/** The running server on this data directory, if any (for the CLI). */
export function runningServer(dataDir: string): { pid: number; url: string } | undefined {
  const paths = dataPaths(dataDir);
  try {
    const info = JSON.parse(fs.readFileSync(paths.serverInfo, 'utf8')) as { pid: number; url: string };
    process.kill(info.pid, 0); // throws if no such process
    return info;
  } catch {
    return undefined;
  }
}
