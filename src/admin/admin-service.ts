import { newId } from '../kernel/ids.ts';
import { CustosError } from '../kernel/errors.ts';
import type { SqlDriver } from '../store/sql-driver.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import { createEhrLaunch, type CreateLaunchResult } from './ehr-launch.ts';
import { rotateSigningKeys } from '../auth/signing-keys.ts';
import { adminEvent } from '../audit/audit-event.ts';
import type { ClientRegistry } from '../auth/client-registry.ts';
import { allOrdinaryPurposes, BREAK_GLASS_PURPOSES, PURPOSES_OF_USE } from '../phi/purpose-of-use.ts';
import {
  createProject,
  recordProjectBaa,
  showProject,
  type CreateProjectRequest,
  type ProjectDetails,
  type ProjectInfo,
  type RecordBaaRequest,
  type RecordBaaResult,
} from './project-baa.ts';

/** What `custos init` and `custos client create` print (INTERFACE.md). */
export interface ClientCredentials {
  projectId: string;
  clientId: string;
  /** Present only when a secret was created or rotated. */
  clientSecret?: string;
  tokenUrl: string;
  fhirBaseUrl: string;
}

export interface InitResult extends ClientCredentials {
  adminUserId: string;
  /** False when the installation already existed. */
  created: boolean;
}

export interface CreateClientRequest {
  projectId: string;
  scopes: string[];
  purposes: string[];
  jwks?: { keys: Record<string, unknown>[] };
  name?: string;
  /** A SMART app's redirect URIs (authorization code flow with PKCE). */
  redirectUris?: string[];
  /** A public SMART app (PKCE, no secret); needs `redirectUris`. */
  public?: boolean;
}

export const DEMO_ADMIN_EMAIL = 'admin@example.org';

/**
 * Administrative actions shared by the CLI (storage opened directly) and the admin API (server
 * running): one implementation, so both paths behave the same. Every action is audited.
 */
export class AdminService {
  constructor(
    private readonly deps: {
      db: SqlDriver;
      clients: ClientRegistry;
      audit: AuditLog;
      publicUrl: string;
      /** The access-token signing JWKS file (src/auth/signing-keys.ts). */
      tokenSigningKeyFile?: string;
    },
  ) {}

  private urls() {
    return { tokenUrl: `${this.deps.publicUrl}/oauth/token`, fhirBaseUrl: `${this.deps.publicUrl}/fhir/R4` };
  }

  private async auditAdmin(requestId: string, what: string, id: string, projectId: string): Promise<void> {
    await this.deps.audit.append(
      adminEvent(what, {
        requestId,
        projectId,
        resource: { type: what.startsWith('client') ? 'Client' : 'Project', id },
      }),
    );
  }

  /**
   * Idempotent first-run set-up: a sandbox project, an administrator and a system client that may
   * claim every purpose of use except break-glass. Run again: same ids, no secret, unless
   * `newSecret` rotates it.
   */
  async init(opts: { newSecret?: boolean; requestId?: string } = {}): Promise<InitResult> {
    const requestId = opts.requestId ?? newId();
    const existing = await this.deps.db.query<{
      project_id: string;
      client_id: string;
      admin_user_id: string;
    }>('SELECT project_id, client_id, admin_user_id FROM installation WHERE id = 1');
    const row = existing.rows[0];
    if (row) {
      let clientSecret: string | undefined;
      if (opts.newSecret) {
        clientSecret = await this.deps.clients.rotateSecret(row.client_id);
        await this.auditAdmin(requestId, 'client.secret_rotated', row.client_id, row.project_id);
      }
      return {
        projectId: row.project_id,
        clientId: row.client_id,
        clientSecret,
        adminUserId: row.admin_user_id,
        created: false,
        ...this.urls(),
      };
    }
    const projectId = newId();
    const adminUserId = newId();
    await this.deps.db.transaction(async (tx) => {
      await tx.query(`INSERT INTO project (id, name, kind) VALUES ($1, 'Demo sandbox', 'sandbox')`, [
        projectId,
      ]);
      await tx.query(`INSERT INTO app_user (id, project_id, role, email) VALUES ($1, $2, 'admin', $3)`, [
        adminUserId,
        projectId,
        DEMO_ADMIN_EMAIL,
      ]);
    });
    const { clientId, clientSecret } = await this.deps.clients.create({
      projectId,
      name: 'init system client',
      scopes: ['system/*.cruds'],
      purposes: allOrdinaryPurposes(),
    });
    // A concurrent init may have won the race: the primary key keeps exactly one installation.
    await this.deps.db.query(
      'INSERT INTO installation (id, project_id, client_id, admin_user_id) VALUES (1, $1, $2, $3) ON CONFLICT (id) DO NOTHING',
      [projectId, clientId, adminUserId],
    );
    const winner = await this.deps.db.query<{ project_id: string }>(
      'SELECT project_id FROM installation WHERE id = 1',
    );
    if (winner.rows[0]?.project_id !== projectId) {
      await this.deps.clients.deactivate(clientId);
      return this.init(opts);
    }
    await this.auditAdmin(requestId, 'project.created', projectId, projectId);
    await this.auditAdmin(requestId, 'client.created', clientId, projectId);
    return { projectId, clientId, clientSecret, adminUserId, created: true, ...this.urls() };
  }

  async createClient(req: CreateClientRequest, requestId = newId()): Promise<ClientCredentials> {
    const project = await this.deps.db.query('SELECT 1 FROM project WHERE id = $1', [req.projectId]);
    if (project.rows.length === 0) {
      throw new CustosError('BAD_REQUEST', [
        { severity: 'error', code: 'not-found', diagnostics: 'No such project.' },
      ]);
    }
    for (const p of req.purposes) {
      if (!PURPOSES_OF_USE.has(p)) {
        throw new CustosError('BAD_REQUEST', [
          { severity: 'error', code: 'value', diagnostics: 'Unknown purpose of use code.' },
        ]);
      }
      if (BREAK_GLASS_PURPOSES.has(p)) {
        throw new CustosError('BAD_REQUEST', [
          {
            severity: 'error',
            code: 'business-rule',
            diagnostics: 'No client may break glass: break-glass is claimed by a person, per request.',
          },
        ]);
      }
    }
    const { clientId, clientSecret } = await this.deps.clients.create({
      projectId: req.projectId,
      name: req.name ?? (req.redirectUris?.length ? 'SMART app' : 'system client'),
      scopes: req.scopes,
      purposes: req.purposes,
      jwks: req.jwks as never,
      ...(req.redirectUris ? { redirectUris: req.redirectUris } : {}),
      ...(req.public ? { public: true } : {}),
    });
    await this.auditAdmin(requestId, 'client.created', clientId, req.projectId);
    return { projectId: req.projectId, clientId, clientSecret, ...this.urls() };
  }

  /**
   * `custos keys rotate-token-signing`: a new access-token signing key first in the key file, the
   * previous one kept to verify earlier tokens (src/auth/signing-keys.ts). Audited. The running
   * server signs with the new key after a restart.
   */
  async rotateTokenSigningKey(
    requestId = newId(),
  ): Promise<{ kid: string; previousKid: string | undefined; removed: number }> {
    if (!this.deps.tokenSigningKeyFile) throw new CustosError('CONFIG_INVALID');
    const r = rotateSigningKeys(this.deps.tokenSigningKeyFile);
    await this.deps.audit.append(
      adminEvent('key.token_signing_rotated', { requestId, resource: { type: 'Key', id: r.kid } }),
    );
    return r;
  }

  /** `custos launch` (src/admin/ehr-launch.ts): an EHR launch of a SMART app for a patient. */
  createLaunch(
    input: { clientId?: unknown; patient?: unknown; encounter?: unknown },
    requestId = newId(),
  ): Promise<CreateLaunchResult> {
    return createEhrLaunch(this.deps, input, requestId);
  }

  /** `custos project create` (src/admin/project-baa.ts): always a sandbox until a BAA is recorded. */
  createProject(req: CreateProjectRequest, requestId = newId()): Promise<ProjectInfo> {
    return createProject(this.deps, req, requestId);
  }

  /** `custos project baa`: records a BAA and promotes the project to production. */
  recordBaa(
    req: Partial<Record<keyof RecordBaaRequest, unknown>>,
    requestId = newId(),
  ): Promise<RecordBaaResult> {
    return recordProjectBaa(this.deps, req, requestId);
  }

  /** `custos project show`: the project's kind and its BAAs. */
  showProject(projectId: string): Promise<ProjectDetails> {
    return showProject(this.deps, projectId);
  }
}
