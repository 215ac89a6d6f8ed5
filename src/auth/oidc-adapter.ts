import { errors, type Adapter, type AdapterPayload } from 'oidc-provider';
import type { SqlDriver, SqlQueryable } from '../store/sql-driver.ts';
import type { ClientRegistration, ClientRegistry } from './client-registry.ts';

/**
 * Client metadata properties that Custos adds to oidc-provider's (registered as
 * `extraClientMetadata.properties` by the authorization server).
 *
 * The SMART scopes are not put in the standard `scope` property: oidc-provider checks every value of
 * a client's `scope` against its static `scopes` list, which cannot enumerate SMART scopes
 * (`system/Observation.rs`, ...). The authorization server reads them from here instead and grants
 * only what they cover (src/auth/authorization-server.ts).
 */
export const CLIENT_SCOPES_METADATA = 'custos_scopes';
export const CLIENT_PURPOSES_METADATA = 'custos_purposes';

/**
 * oidc-provider's storage, in the resource database's `oidc_payload` table, so that grants and the
 * replay cache survive restarts and are shared by every server process.
 * https://github.com/panva/node-oidc-provider/blob/main/docs/README.md#adapter
 *
 * Model `Client` is not stored here: it is read from {@link ClientRegistry}, so that a rotated
 * secret or a deactivated client takes effect at the next request.
 */
export class PostgresOidcAdapter implements Adapter {
  constructor(
    private readonly model: string,
    private readonly db: SqlDriver,
    private readonly clients: ClientRegistry,
  ) {}

  async upsert(id: string, payload: AdapterPayload, expiresIn: number | undefined): Promise<void> {
    if (this.model === 'Client') throw new Error('clients are managed by ClientRegistry');
    const values = [
      this.model,
      id,
      JSON.stringify(payload),
      payload.grantId ?? null,
      payload.userCode ?? null,
      payload.uid ?? null,
      typeof expiresIn === 'number' ? expiresIn : null,
    ];
    const insert = `INSERT INTO oidc_payload (model, id, payload, grant_id, user_code, uid, expires_at)
      VALUES ($1, $2, $3::jsonb, $4, $5, $6, now() + make_interval(secs => $7::double precision))
      ON CONFLICT (model, id) DO UPDATE SET payload = EXCLUDED.payload, grant_id = EXCLUDED.grant_id,
        user_code = EXCLUDED.user_code, uid = EXCLUDED.uid, expires_at = EXCLUDED.expires_at, consumed_at = NULL`;
    if (this.model !== 'ReplayDetection') {
      await this.db.query(insert, values);
      return;
    }
    // oidc-provider checks a jti with find() and then records it with upsert(): two concurrent
    // requests with the same client assertion could both pass. Recording the jti only if it is absent
    // (or expired) makes the check atomic in the database; the loser is refused as a replay, with the
    // error oidc-provider would give (SMART: "invalid_client"). DPoP and client attestation, the other
    // users of ReplayDetection, are disabled.
    const { rows } = await this.db.query(
      `${insert} WHERE oidc_payload.expires_at IS NOT NULL AND oidc_payload.expires_at <= now() RETURNING 1`,
      values,
    );
    if (rows.length === 0) {
      throw new errors.InvalidClientAuth('client assertion tokens must only be used once');
    }
  }

  async find(id: string): Promise<AdapterPayload | undefined> {
    if (this.model === 'Client') return this.findClient(id);
    return this.findWhere('id = $2', id);
  }

  findByUid(uid: string): Promise<AdapterPayload | undefined> {
    return this.findWhere('uid = $2', uid);
  }

  findByUserCode(userCode: string): Promise<AdapterPayload | undefined> {
    return this.findWhere('user_code = $2', userCode);
  }

  async consume(id: string): Promise<void> {
    await this.db.query('UPDATE oidc_payload SET consumed_at = now() WHERE model = $1 AND id = $2', [
      this.model,
      id,
    ]);
  }

  async destroy(id: string): Promise<void> {
    await this.db.query('DELETE FROM oidc_payload WHERE model = $1 AND id = $2', [this.model, id]);
  }

  async revokeByGrantId(grantId: string): Promise<void> {
    await this.db.query('DELETE FROM oidc_payload WHERE model = $1 AND grant_id = $2', [this.model, grantId]);
  }

  /** Expired rows are invisible; `consumed` is reported in epoch seconds, as oidc-provider expects. */
  private async findWhere(condition: string, value: string): Promise<AdapterPayload | undefined> {
    const { rows } = await this.db.query<{ payload: AdapterPayload; consumed: number | null }>(
      `SELECT payload, floor(extract(epoch FROM consumed_at))::integer AS consumed FROM oidc_payload
       WHERE model = $1 AND ${condition} AND (expires_at IS NULL OR expires_at > now())`,
      [this.model, value],
    );
    const row = rows[0];
    if (!row) return undefined;
    return row.consumed === null ? row.payload : { ...row.payload, consumed: row.consumed };
  }

  private async findClient(id: string): Promise<AdapterPayload | undefined> {
    const client = await this.clients.find(id);
    if (!client || !client.active) return undefined;
    return clientMetadata(client, this.clients.currentSecret(client));
  }
}

/**
 * OAuth client metadata (RFC 7591 names) of a registration. A client with redirect URIs is a SMART
 * app: authorization code (PKCE always, src/auth/authorization-server.ts) and rotating refresh
 * tokens; a confidential one may also use client credentials for its system scopes. A client without
 * is a system client: client credentials only.
 */
function clientMetadata(client: ClientRegistration, secret: string | undefined): AdapterPayload | undefined {
  const app = client.redirectUris.length > 0;
  const common = {
    client_id: client.id,
    client_name: client.name,
    grant_types: app
      ? [
          'authorization_code',
          'refresh_token',
          ...(client.authMethod === 'none' ? [] : ['client_credentials']),
        ]
      : ['client_credentials'],
    response_types: app ? ['code'] : [],
    redirect_uris: [...client.redirectUris],
    [CLIENT_SCOPES_METADATA]: [...client.scopes],
    [CLIENT_PURPOSES_METADATA]: [...client.purposes],
  };
  switch (client.authMethod) {
    case 'client_secret':
      // client_secret_basic: oidc-provider then accepts the secret in the body too (client_secret_post).
      return { ...common, token_endpoint_auth_method: 'client_secret_basic', client_secret: secret };
    case 'private_key_jwt':
      return { ...common, token_endpoint_auth_method: 'private_key_jwt', jwks: client.jwks };
    case 'none':
      return app ? { ...common, token_endpoint_auth_method: 'none' } : undefined;
    default:
      return undefined;
  }
}

/** The adapter factory to give oidc-provider as `adapter`. */
export function createOidcAdapter(db: SqlDriver, clients: ClientRegistry): (model: string) => Adapter {
  return (model) => new PostgresOidcAdapter(model, db, clients);
}

/** Deletes expired rows (replay cache entries, old grants); run it now and then. Returns how many. */
export async function purgeExpiredOidcPayloads(db: SqlQueryable): Promise<number> {
  const { rows } = await db.query('DELETE FROM oidc_payload WHERE expires_at <= now() RETURNING 1');
  return rows.length;
}
