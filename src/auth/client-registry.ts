import { createHmac, randomBytes } from 'node:crypto';
import type { JSONWebKeySet } from 'jose';
import type { SqlDriver } from '../store/sql-driver.ts';
import { CustosError } from '../kernel/errors.ts';
import { PRIVATE_JWK_MEMBERS, readOrCreateKeyFile } from '../kernel/key-file.ts';
import { parseSmartScope } from './smart-scopes.ts';
import { isLaunchScope } from './smart-launch.ts';

/** How a client proves who it is at the token endpoint. */
export type ClientAuthMethod = 'client_secret' | 'private_key_jwt' | 'none';

/** A registered OAuth client, as stored (never with a secret). */
export interface ClientRegistration {
  readonly id: string;
  readonly projectId: string;
  readonly name: string;
  readonly authMethod: ClientAuthMethod;
  /** Incremented by {@link ClientRegistry.rotateSecret}; the secret is derived from it. */
  readonly secretVersion: number;
  readonly jwks: JSONWebKeySet | undefined;
  /** SMART scopes the client may be granted, e.g. `system/*.cruds`. */
  readonly scopes: readonly string[];
  /** HL7 v3 PurposeOfUse codes the client may claim, e.g. `TREAT`. */
  readonly purposes: readonly string[];
  readonly mayBreakGlass: boolean;
  readonly active: boolean;
  /** Registered redirect URIs of a SMART app (authorization code flow); empty for system clients. */
  readonly redirectUris: readonly string[];
}

/** The browser origins a client's pages run on: those of its redirect URIs (CORS, docs/users.md). */
export function allowedOrigins(client: ClientRegistration): string[] {
  return [...new Set(client.redirectUris.map((u) => new URL(u).origin))];
}

/**
 * A new client id: 128 random bits, base64url, drawn again while it starts with '-' or '_' (about 1 in
 * 32). Such an id reads as an option on a command line (`--client -x…` is refused by the argument
 * parser) and a leading '-' is what a spreadsheet runs as a formula, so CSV reports would show it
 * behind the formula guard's apostrophe.
 */
export function newClientId(): string {
  for (;;) {
    const id = randomBytes(16).toString('base64url');
    if (/^[A-Za-z0-9]/.test(id)) return id;
  }
}

export interface CreateClientInput {
  projectId: string;
  name: string;
  scopes: string[];
  purposes: string[];
  /** Public keys for `private_key_jwt` (SMART Backend Services); without it the client gets a secret. */
  jwks?: JSONWebKeySet;
  mayBreakGlass?: boolean;
  /**
   * A SMART app: the redirect URIs of the authorization code flow (https, or http on a loopback
   * address for native and development apps, RFC 8252). Its scopes may then include `patient/` and
   * `user/` scopes and the launch scopes (`openid`, `fhirUser`, `launch/patient`, `offline_access`, ...).
   */
  redirectUris?: string[];
  /** A public SMART app (a browser or native app that cannot keep a secret): PKCE, no secret. */
  public?: boolean;
}

interface ClientRow {
  id: string;
  project_id: string;
  name: string;
  auth_method: ClientAuthMethod;
  secret_version: number;
  jwks: JSONWebKeySet | null;
  scopes: string[];
  purposes: string[];
  may_break_glass: boolean;
  active: boolean;
  redirect_uris: string[];
}

const COLUMNS =
  'id, project_id, name, auth_method, secret_version, jwks, scopes, purposes, may_break_glass, active, redirect_uris';
const PURPOSE = /^[A-Z]{2,12}$/;

/**
 * The OAuth clients of every project, in table `oauth_client`.
 *
 * Client secrets are never stored: a secret is `base64url(HMAC-SHA256(key, clientId:secretVersion))`
 * with a 32-byte key kept in `keyFile`, outside the database (DESIGN.md rule 5). A dump of the
 * database therefore reveals no credential, and rotating a secret is incrementing `secret_version`.
 *
 * @example
 * const clients = new ClientRegistry({ db, keyFile: '.custos/client-secret.key' });
 * const { clientId, clientSecret } = await clients.create({
 *   projectId, name: 'lab feed', scopes: ['system/Observation.cruds'], purposes: ['TREAT'],
 * });
 */
export class ClientRegistry {
  private readonly db: SqlDriver;
  private readonly key: Buffer;

  constructor(opts: { db: SqlDriver; keyFile: string }) {
    this.db = opts.db;
    const text = readOrCreateKeyFile(opts.keyFile, () => randomBytes(32).toString('base64url') + '\n');
    const key = Buffer.from(text.trim(), 'base64url');
    if (key.length !== 32) throw new CustosError('CONFIG_INVALID');
    this.key = key;
  }

  /**
   * Registers a client. Returns its secret (shown once; derivable again only by rotation) unless
   * `jwks` is given, in which case the client authenticates with `private_key_jwt`.
   * Scopes must be SMART resource scopes and purposes v3 ActReason codes, else `BAD_REQUEST`;
   * an unknown project is `NOT_FOUND`.
   */
  async create(input: CreateClientInput): Promise<{ clientId: string; clientSecret?: string }> {
    if (typeof input.name !== 'string' || input.name.trim() === '') throw new CustosError('BAD_REQUEST');
    const redirectUris = [...new Set(input.redirectUris ?? [])];
    redirectUris.forEach(assertRedirectUri);
    const app = redirectUris.length > 0;
    if (input.public && !app) throw badField('A public client needs a redirect URI.', 'redirectUris');
    if (input.public && input.jwks) throw badField('A public client has no keys.', 'jwks');
    const resourceScopes = input.scopes.filter((s) => !(app && isLaunchScope(s)));
    if (resourceScopes.length === 0 || resourceScopes.some((s) => parseSmartScope(s) === null)) {
      throw new CustosError('BAD_REQUEST');
    }
    // A system scope on an app would let a browser hold a token for the whole project.
    if (input.public && resourceScopes.some((s) => parseSmartScope(s)?.context === 'system')) {
      throw badField('A public client may not have system scopes.', 'scopes');
    }
    if (input.purposes.some((p) => !PURPOSE.test(p))) throw new CustosError('BAD_REQUEST');
    if (input.jwks !== undefined) assertPublicJwks(input.jwks);

    const id = newClientId();
    const authMethod: ClientAuthMethod = input.public
      ? 'none'
      : input.jwks
        ? 'private_key_jwt'
        : 'client_secret';
    await this.insert(
      `INSERT INTO oauth_client (id, project_id, name, auth_method, jwks, scopes, purposes, may_break_glass, redirect_uris)
       VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9)`,
      [
        id,
        input.projectId,
        input.name,
        authMethod,
        input.jwks ? JSON.stringify(input.jwks) : null,
        [...new Set(input.scopes)],
        [...new Set(input.purposes)],
        input.mayBreakGlass ?? false,
        redirectUris,
      ],
    );
    return authMethod === 'client_secret'
      ? { clientId: id, clientSecret: this.deriveSecret(id, 0) }
      : { clientId: id };
  }

  /** The registration, active or not; undefined when no such client exists. */
  async find(clientId: string): Promise<ClientRegistration | undefined> {
    const { rows } = await this.db.query<ClientRow>(`SELECT ${COLUMNS} FROM oauth_client WHERE id = $1`, [
      clientId,
    ]);
    return rows[0] ? toRegistration(rows[0]) : undefined;
  }

  /** All clients of a project, oldest first. */
  async listByProject(projectId: string): Promise<ClientRegistration[]> {
    const { rows } = await this.db.query<ClientRow>(
      `SELECT ${COLUMNS} FROM oauth_client WHERE project_id = $1 ORDER BY created_at, id`,
      [projectId],
    );
    return rows.map(toRegistration);
  }

  /**
   * Replaces the secret of an active `client_secret` client and returns the new one; the old one
   * stops working at once. `NOT_FOUND` for any other client.
   */
  async rotateSecret(clientId: string): Promise<string> {
    const { rows } = await this.db.query<{ secret_version: number }>(
      `UPDATE oauth_client SET secret_version = secret_version + 1
       WHERE id = $1 AND auth_method = 'client_secret' AND active RETURNING secret_version`,
      [clientId],
    );
    if (!rows[0]) throw new CustosError('NOT_FOUND');
    return this.deriveSecret(clientId, rows[0].secret_version);
  }

  /**
   * Deactivates a client: the token endpoint refuses it from now on. Access tokens already issued
   * stay valid until they expire (at most 300 s) unless the resource server checks `active`.
   */
  async deactivate(clientId: string): Promise<void> {
    const { rows } = await this.db.query(
      `UPDATE oauth_client SET active = false WHERE id = $1 RETURNING id`,
      [clientId],
    );
    if (!rows[0]) throw new CustosError('NOT_FOUND');
  }

  /**
   * The current secret of a `client_secret` client, for the authorization server's client lookup
   * (src/auth/oidc-adapter.ts) only. Undefined for other clients.
   */
  currentSecret(client: ClientRegistration): string | undefined {
    return client.authMethod === 'client_secret'
      ? this.deriveSecret(client.id, client.secretVersion)
      : undefined;
  }

  /** An unknown project (foreign key violation, SQLSTATE 23503) is NOT_FOUND, not an internal error. */
  private async insert(sql: string, params: unknown[]): Promise<void> {
    try {
      await this.db.query(sql, params);
    } catch (e) {
      if ((e as { code?: unknown }).code === '23503') throw new CustosError('NOT_FOUND');
      throw e;
    }
  }

  private deriveSecret(clientId: string, version: number): string {
    return createHmac('sha256', this.key).update(`${clientId}:${version}`).digest('base64url');
  }
}

function toRegistration(r: ClientRow): ClientRegistration {
  return {
    id: r.id,
    projectId: r.project_id,
    name: r.name,
    authMethod: r.auth_method,
    secretVersion: r.secret_version,
    jwks: r.jwks ?? undefined,
    scopes: r.scopes,
    purposes: r.purposes,
    mayBreakGlass: r.may_break_glass,
    active: r.active,
    redirectUris: r.redirect_uris ?? [],
  };
}

function badField(diagnostics: string, expression: string): CustosError {
  return new CustosError('BAD_REQUEST', [{ severity: 'error', code: 'value', diagnostics, expression }]);
}

/** https, or http on a loopback address (RFC 8252 section 7.3); absolute, no fragment, no credentials. */
function assertRedirectUri(uri: unknown): void {
  let u: URL;
  try {
    u = new URL(String(uri));
  } catch {
    throw badField('A redirect URI must be an absolute URL.', 'redirectUris');
  }
  const loopback = ['127.0.0.1', '[::1]', 'localhost'].includes(u.hostname);
  if (
    !(u.protocol === 'https:' || (u.protocol === 'http:' && loopback)) ||
    u.hash ||
    u.username ||
    u.password ||
    String(uri).length > 2000
  ) {
    throw badField(
      'A redirect URI must be https (http only on a loopback address), without fragment or credentials.',
      'redirectUris',
    );
  }
}

/** Refuses a JWKS that is malformed or holds private key material (a client must never send us its private key). */
function assertPublicJwks(jwks: JSONWebKeySet): void {
  const keys: unknown = (jwks as { keys?: unknown } | null)?.keys;
  if (!Array.isArray(keys) || keys.length === 0) throw new CustosError('BAD_REQUEST');
  for (const k of keys as unknown[]) {
    if (typeof k !== 'object' || k === null) throw new CustosError('BAD_REQUEST');
    const jwk = k as Record<string, unknown>;
    if (!['RSA', 'EC', 'OKP'].includes(jwk.kty as string) || PRIVATE_JWK_MEMBERS.some((m) => m in jwk)) {
      throw new CustosError('BAD_REQUEST');
    }
  }
}
