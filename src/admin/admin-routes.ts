import { timingSafeEqual } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { CustosError } from '../kernel/errors.ts';
import type { AdminService, CreateClientRequest } from './admin-service.ts';
import { documentSha256 } from './project-baa.ts';
import { registerVendorRoutes } from './vendor-routes.ts';
import { registerPolicyRoutes } from './policy-routes.ts';
import { registerFlowRoutes } from './flow-routes.ts';
import { registerSubscriptionRoutes } from './subscription-routes.ts';
import type { FlowMap } from '../egress/flow-map.ts';
import type { SqlDriver } from '../store/sql-driver.ts';
import type { VendorRegistry } from '../egress/vendor-registry.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import type { Checkpoints } from '../audit/checkpoints.ts';
import { witnessRequest, type Witnesses } from '../audit/witness.ts';
import { verifyAuditLog } from '../audit/audit-verify.ts';
import { reportBundle, reportCsv, type AuditReports, type ReportKind } from '../audit/audit-report.ts';
import type { ReindexResult } from '../phi/reindex.ts';
import type { UserRef, UserService } from '../auth/users.ts';
import {
  approveKeyDestruction,
  requestKeyDestruction,
  rewrapKeys,
  rotateKeys,
  type KeyAdminDeps,
} from '../phi/key-admin.ts';

type CustosCoreReindex = (opts: {
  all?: boolean;
  batch?: number;
  requestId?: string;
}) => Promise<ReindexResult>;

/** The header carrying the admin token that the server writes to `<dataDir>/admin-token` (mode 0600). */
export const ADMIN_TOKEN_HEADER = 'x-custos-admin-token';

/**
 * The admin API used by the CLI while the server holds the embedded storage. Possession of the
 * token file (readable only by the account that runs Custos) is the credential.
 */
export function registerAdminRoutes(
  app: FastifyInstance,
  admin: AdminService,
  adminToken: string,
  core: {
    audit: AuditLog;
    checkpoints: Checkpoints;
    witnesses: Witnesses;
    reindex: CustosCoreReindex;
    keys: KeyAdminDeps | undefined;
    reports: AuditReports;
    auditQuery: { fhirBaseUrl: string };
    users: UserService;
    vendors: VendorRegistry;
    resourceDb: SqlDriver;
    flows(): Promise<FlowMap>;
  },
): void {
  const expected = Buffer.from(adminToken, 'utf8');
  const check = (req: FastifyRequest) => {
    const got = Buffer.from(String(req.headers[ADMIN_TOKEN_HEADER] ?? ''), 'utf8');
    if (got.length !== expected.length || !timingSafeEqual(got, expected))
      throw new CustosError('ADMIN_TOKEN_INVALID');
  };
  app.post('/admin/init', async (req) => {
    check(req);
    const body = (req.body ?? {}) as { newSecret?: unknown };
    return admin.init({ newSecret: body.newSecret === true, requestId: req.id });
  });
  app.post('/admin/audit/verify', async (req) => {
    check(req);
    return verifyAuditLog(core.audit, core.checkpoints, { witnesses: core.witnesses });
  });
  // Reports over the audit log (docs/audit.md): body { patient, since?, until?, project?, purpose?,
  // format?: 'fhir' | 'csv' }. FHIR: a Bundle of AuditEvents; CSV: text/csv. Each run is audited.
  const report = (kind: ReportKind) => async (req: FastifyRequest, reply: FastifyReply) => {
    check(req);
    const b = (req.body ?? {}) as Record<string, unknown>;
    const text = (k: string) => (typeof b[k] === 'string' && b[k] !== '' ? (b[k] as string) : undefined);
    if (b.format !== undefined && b.format !== 'fhir' && b.format !== 'csv')
      throw new CustosError('BAD_REQUEST', [
        {
          severity: 'error',
          code: 'invalid',
          expression: 'format',
          diagnostics: "format must be 'fhir' or 'csv'.",
        },
      ]);
    const r = await core.reports.run(kind, {
      patient: text('patient') ?? '',
      since: text('since'),
      until: text('until'),
      projectId: text('project'),
      purpose: text('purpose'),
      requestId: req.id,
    });
    if (b.format === 'csv') return reply.type('text/csv; charset=utf-8').send(reportCsv(r));
    return reply
      .type('application/fhir+json; charset=utf-8')
      .send(JSON.stringify(reportBundle(r, core.auditQuery.fhirBaseUrl)));
  };
  app.post('/admin/audit/report', report('access'));
  app.post('/admin/audit/disclosures', report('disclosures'));
  app.post('/admin/audit/checkpoint', async (req) => {
    check(req);
    return core.checkpoints.checkpoint();
  });
  app.post('/admin/audit/prove', async (req) => {
    check(req);
    const seq = (req.body as { seq?: unknown } | null)?.seq;
    const proof = typeof seq === 'number' ? await core.checkpoints.prove(seq) : undefined;
    if (!proof) throw new CustosError('NOT_FOUND');
    return proof;
  });
  // RFC 9162 consistency proof between two tree sizes ({from, to}; without `to`, to the current log,
  // signing a checkpoint of it). Bad sizes are a 400 with the reason in the diagnostics.
  app.post('/admin/audit/consistency', async (req) => {
    check(req);
    const b = (req.body ?? {}) as { from?: unknown; to?: unknown };
    return core.checkpoints.consistency(b.from, b.to ?? undefined);
  });
  // Checkpoint witnesses (docs/audit.md, "Witnesses"). The C2SP tlog-witness add-checkpoint body for
  // the newest signed checkpoint with a consistency proof from `old`: POST {old} gives it in JSON,
  // GET ?old=N as the exact text/plain body to send to any witness by hand.
  app.post('/admin/audit/witness-request', async (req) => {
    check(req);
    return witnessRequest(core.checkpoints, (req.body as { old?: unknown } | null)?.old);
  });
  app.get('/admin/audit/witness-request', async (req, reply) => {
    check(req);
    const old = (req.query as { old?: unknown } | null)?.old;
    const n = typeof old === 'string' && /^\d{1,15}$/.test(old) ? Number(old) : old;
    const r = await witnessRequest(core.checkpoints, n);
    return reply.type('text/plain; charset=utf-8').send(r.body);
  });
  app.post('/admin/audit/witnesses', async (req) => {
    check(req);
    return core.witnesses.status();
  });
  // Key administration (docs/keys.md). Absent keys (encryption off) is a configuration error.
  const keys = (): KeyAdminDeps => {
    if (!core.keys) throw new CustosError('CONFIG_INVALID');
    return core.keys;
  };
  const str = (v: unknown) => (typeof v === 'string' && v !== '' ? v : undefined);
  app.post('/admin/keys/rotate', async (req) => {
    check(req);
    return rotateKeys(keys(), { projectId: str((req.body as { projectId?: unknown } | null)?.projectId) });
  });
  app.post('/admin/keys/rewrap', async (req) => {
    check(req);
    const b = (req.body ?? {}) as { projectId?: unknown; reencrypt?: unknown };
    return rewrapKeys(keys(), { projectId: str(b.projectId), reencrypt: b.reencrypt === true });
  });
  app.post('/admin/keys/destroy', async (req) => {
    check(req);
    const b = (req.body ?? {}) as { projectId?: unknown; approve?: unknown; adminUserId?: unknown };
    const admin = str(b.adminUserId);
    if (!admin) throw new CustosError('BAD_REQUEST');
    const approve = str(b.approve);
    if (approve) return approveKeyDestruction(keys(), { requestId: approve, adminUserId: admin });
    const projectId = str(b.projectId);
    if (!projectId) throw new CustosError('BAD_REQUEST');
    return requestKeyDestruction(keys(), { projectId, adminUserId: admin });
  });
  app.post('/admin/reindex', async (req) => {
    check(req);
    const b = (req.body ?? {}) as { all?: unknown; batch?: unknown };
    return core.reindex({
      all: b.all === true,
      batch: typeof b.batch === 'number' ? b.batch : undefined,
      requestId: req.id,
    });
  });
  // People (docs/users.md). Bodies carry passwords: Fastify's logger is off and nothing here logs a body.
  // A user is named by { userId } or by { projectId, email }.
  const userRef = (b: Record<string, unknown>): UserRef => {
    if (str(b.userId)) return { userId: b.userId as string };
    if (str(b.projectId) && str(b.email))
      return { projectId: b.projectId as string, email: b.email as string };
    throw new CustosError('BAD_REQUEST', [
      {
        severity: 'error',
        code: 'required',
        diagnostics: 'Name the user by userId, or by projectId and email.',
      },
    ]);
  };
  const body = (req: FastifyRequest) => (req.body ?? {}) as Record<string, unknown>;
  app.post('/admin/users', async (req) => {
    check(req);
    const b = body(req);
    return core.users.create(
      {
        projectId: str(b.projectId) ?? '',
        role: String(b.role ?? ''),
        email: b.email as string,
        fhirUser: b.fhirUser === undefined || b.fhirUser === null ? undefined : String(b.fhirUser),
        mfa: b.mfa === true,
        password: b.password as string,
      },
      req.id,
    );
  });
  app.post('/admin/users/reset-password', async (req) => {
    check(req);
    const b = body(req);
    return core.users.resetPassword(userRef(b), b.password as string, req.id);
  });
  app.post('/admin/users/reset-mfa', async (req) => {
    check(req);
    return core.users.resetMfa(userRef(body(req)), req.id);
  });
  app.post('/admin/users/deactivate', async (req) => {
    check(req);
    return core.users.deactivate(userRef(body(req)), req.id);
  });
  app.post('/admin/projects/mfa', async (req) => {
    check(req);
    const b = body(req);
    if (!str(b.projectId) || typeof b.required !== 'boolean')
      throw new CustosError('BAD_REQUEST', [
        { severity: 'error', code: 'required', diagnostics: 'Give projectId and required (true or false).' },
      ]);
    return core.users.setProjectMfaRequired(b.projectId as string, b.required, req.id);
  });
  // Projects and BAAs (docs/phi-boundary.md). A BAA body names the document by its SHA-256
  // (documentSha256) or carries it (documentBase64): it is hashed here and not kept.
  app.post('/admin/projects', async (req) => {
    check(req);
    const b = (req.body ?? {}) as { name?: unknown; production?: unknown };
    return admin.createProject({ name: b.name as string, production: b.production === true }, req.id);
  });
  app.post('/admin/projects/baa', async (req) => {
    check(req);
    const { documentBase64, ...b } = (req.body ?? {}) as Record<string, unknown>;
    if (typeof documentBase64 === 'string' && b.documentSha256 === undefined)
      b.documentSha256 = documentSha256(Buffer.from(documentBase64, 'base64'));
    return admin.recordBaa(b, req.id);
  });
  app.post('/admin/projects/show', async (req) => {
    check(req);
    const id = (req.body as { projectId?: unknown } | null)?.projectId;
    if (typeof id !== 'string' || id === '') throw new CustosError('PROJECT_NOT_FOUND');
    return admin.showProject(id);
  });
  registerVendorRoutes(app, core.vendors, check);
  registerPolicyRoutes(app, core, check);
  registerFlowRoutes(app, core, check);
  registerSubscriptionRoutes(app, core, check);
  app.post('/admin/keys/token-signing/rotate', async (req) => {
    check(req);
    return { ...(await admin.rotateTokenSigningKey(req.id)), restartRequired: true };
  });
  app.post('/admin/launches', async (req) => {
    check(req);
    return admin.createLaunch((req.body ?? {}) as Record<string, unknown>, req.id);
  });
  app.post('/admin/clients', async (req) => {
    check(req);
    const b = (req.body ?? {}) as Partial<CreateClientRequest>;
    if (typeof b.projectId !== 'string' || !Array.isArray(b.scopes) || !Array.isArray(b.purposes))
      throw new CustosError('BAD_REQUEST');
    return admin.createClient(
      {
        projectId: b.projectId,
        scopes: b.scopes.map(String),
        purposes: b.purposes.map(String),
        jwks: b.jwks,
        name: typeof b.name === 'string' ? b.name : undefined,
        ...(Array.isArray(b.redirectUris) ? { redirectUris: b.redirectUris.map(String) } : {}),
        ...(b.public === true ? { public: true } : {}),
      },
      req.id,
    );
  });
}
