import { generateKeyPairSync, randomBytes } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { JSONWebKeySet, JWK } from 'jose';
import { Provider, errors } from 'oidc-provider';
import type { SqlDriver } from '../store/sql-driver.ts';
import { errorFields, type Logger } from '../log/logger.ts';
import { CustosError } from '../kernel/errors.ts';
import type { ClientRegistry } from './client-registry.ts';
import { PRIVATE_JWK_MEMBERS, readOrCreateKeyFile } from '../kernel/key-file.ts';
import { CLIENT_PURPOSES_METADATA, CLIENT_SCOPES_METADATA, createOidcAdapter } from './oidc-adapter.ts';
import { covers, parseSmartScope, parseSmartScopes } from './smart-scopes.ts';
import { ACCESS_TOKEN_ALG, ACCESS_TOKEN_TTL, fhirAudience as audienceOf } from './access-token.ts';

/** Seconds of clock skew allowed on client assertions (oidc-provider's default). */
const CLOCK_TOLERANCE = 15;

export interface AuthorizationServerOptions {
  /** The public base URL, e.g. `http://127.0.0.1:8080` (no path). Every URL the server prints or checks derives from it. */
  issuer: string;
  db: SqlDriver;
  clients: ClientRegistry;
  /** JWKS file holding the private signing key(s); created (mode 0600) when missing. Never in the database. */
  signingKeyFile: string;
  log: Logger;
}

export interface AuthorizationServer {
  /** Node request handler for `/oauth/*` and `/.well-known/openid-configuration`. Give it the raw, unread request. */
  handler(req: IncomingMessage, res: ServerResponse): void;
  readonly issuer: string;
  /** The public keys that verify our access tokens (what `/oauth/jwks` serves). */
  jwks(): JSONWebKeySet;
}

/** Minimal shapes of the oidc-provider objects our callbacks read. */
interface OidcClient {
  clientId: string;
  [metadata: string]: unknown;
}
interface OidcContext {
  oidc: { params?: Record<string, unknown>; client?: OidcClient };
}
interface OidcToken {
  clientId?: string;
}

const ROUTES = {
  token: '/oauth/token',
  jwks: '/oauth/jwks',
  introspection: '/oauth/introspect',
  revocation: '/oauth/revoke',
  // Not served yet (no authorization code flow), but kept under /oauth/ so the HTTP layer's mount covers them.
  authorization: '/oauth/authorize',
  end_session: '/oauth/logout',
  userinfo: '/oauth/userinfo',
  pushed_authorization_request: '/oauth/par',
};

/**
 * Custos' OAuth 2.0 authorization server, built on oidc-provider (OpenID certified).
 *
 * Today it issues access tokens to systems with the client credentials grant, authenticated by a
 * client secret (HTTP Basic or form body) or, as SMART Backend Services specifies, by a signed JWT
 * assertion (`private_key_jwt`, RS384/ES384, also RS256/ES256):
 * https://hl7.org/fhir/smart-app-launch/backend-services.html#obtaining-an-access-token
 *
 * Access tokens are JWTs (RFC 9068, `typ: at+jwt`) for audience `${issuer}/fhir/R4`, signed ES256 with
 * a key from `signingKeyFile`, valid {@link ACCESS_TOKEN_TTL} seconds, carrying `client_id`, `scope`
 * and, when the client is registered with exactly one purpose of use, `purpose_of_use`.
 *
 * Scopes: each requested SMART scope is granted if the client's registered scopes cover it
 * (`system/Patient.rs` under `system/*.cruds`); others are dropped, and the response's `scope` says
 * what was granted (RFC 6749 section 5.1). A request with no grantable scope, or no scope at all, is
 * refused with `invalid_scope`.
 *
 * @example
 * const auth = await createAuthorizationServer({ issuer: 'http://127.0.0.1:8080', db, clients, signingKeyFile, log });
 * http.createServer((req, res) => auth.handler(req, res)).listen(8080);
 */
export async function createAuthorizationServer(
  opts: AuthorizationServerOptions,
): Promise<AuthorizationServer> {
  const issuer = new URL(opts.issuer);
  if (issuer.pathname !== '/' || issuer.search || issuer.hash || !/^https?:$/.test(issuer.protocol)) {
    throw new CustosError('CONFIG_INVALID');
  }
  const issuerUrl = issuer.origin;
  const fhirAudience = audienceOf(issuerUrl);
  const tokenUrl = `${issuerUrl}${ROUTES.token}`;
  const privateJwks = loadSigningKeys(opts.signingKeyFile);
  const publicJwks: JSONWebKeySet = { keys: privateJwks.keys.map(publicPart) };
  const { log } = opts;

  const provider = new Provider(issuerUrl, {
    adapter: createOidcAdapter(opts.db, opts.clients),
    jwks: privateJwks,
    routes: ROUTES,
    // SMART scopes are not static scopes: they are granted per client in getResourceServerInfo below.
    scopes: ['openid'],
    responseTypes: [],
    clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
    clientDefaults: {
      grant_types: ['client_credentials'],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_basic',
      id_token_signed_response_alg: ACCESS_TOKEN_ALG,
    },
    extraClientMetadata: { properties: [CLIENT_SCOPES_METADATA, CLIENT_PURPOSES_METADATA] },
    enabledJWA: {
      // https://hl7.org/fhir/smart-app-launch/backend-services.html#signature-verification: RS384 and ES384.
      clientAuthSigningAlgValues: ['RS384', 'ES384', 'RS256', 'ES256'],
      idTokenSigningAlgValues: [ACCESS_TOKEN_ALG],
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true, allowedPolicy: ownTokenOnly },
      revocation: { enabled: true, allowedPolicy: ownTokenOnly },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => fhirAudience,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx: OidcContext, resource: string, client: OidcClient) => {
          if (resource !== fhirAudience) throw new errors.InvalidTarget();
          const scope = grantableScopes(ctx, client);
          if (scope.length === 0) throw new errors.InvalidScope('requested scope is not allowed');
          return {
            scope: scope.join(' '),
            audience: fhirAudience,
            accessTokenTTL: ACCESS_TOKEN_TTL,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: ACCESS_TOKEN_ALG } },
          };
        },
      },
      dPoP: { enabled: false },
      pushedAuthorizationRequests: { enabled: false },
      rpInitiatedLogout: { enabled: false },
      userinfo: { enabled: false },
    },
    extraTokenClaims: (ctx: OidcContext) => {
      // IHE IUA / HL7 B2B: a default purpose of use the resource server may apply (INTERFACE.md).
      const purposes = ctx.oidc.client?.[CLIENT_PURPOSES_METADATA];
      return Array.isArray(purposes) && purposes.length === 1 ? { purpose_of_use: purposes[0] } : undefined;
    },
    assertJwtClientAuthClaimsAndHeader: (_ctx: OidcContext, claims: Record<string, unknown>) => {
      // oidc-provider also accepts the issuer URL as `aud`; SMART wants the token URL exactly.
      const aud = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
      if (!aud.includes(tokenUrl)) throw new errors.InvalidClientAuth('aud must be the token endpoint URL');
      // "exp ... SHALL be no more than five minutes in the future".
      const exp = claims.exp as number;
      if (exp > Math.floor(Date.now() / 1000) + 300 + CLOCK_TOLERANCE) {
        throw new errors.InvalidClientAuth('exp must be at most five minutes in the future');
      }
    },
    clockTolerance: CLOCK_TOLERANCE,
    ttl: {
      AccessToken: ACCESS_TOKEN_TTL,
      ClientCredentials: ACCESS_TOKEN_TTL,
      AuthorizationCode: 60,
      Grant: 3600,
      IdToken: ACCESS_TOKEN_TTL,
      Interaction: 600,
      Session: 3600,
    },
    // Backend services call from servers, never from browsers.
    clientBasedCORS: () => false,
    // Error pages show the OAuth error code only, never a description that could echo input.
    renderError: (ctx: { type: string; body: unknown }, out: { error?: string }) => {
      ctx.type = 'text/plain';
      ctx.body = `error: ${out.error ?? 'server_error'}\n`;
    },
  });

  // URLs (discovery, the accepted client assertion `aud`) are derived from the configured issuer, not
  // from Host or X-Forwarded-* headers a client controls: we set those headers ourselves and let Koa
  // believe them (`proxy`). This also serves an https issuer from behind a TLS-terminating proxy.
  provider.proxy = true;
  // oidc-provider's error_description can quote input (a client id, an Origin header), and its CORS
  // handling reflects Origin. Error bodies keep only the OAuth error code; a reflected origin goes.
  provider.use(async (ctx, next) => {
    await next();
    const allowOrigin = ctx.response.get('Access-Control-Allow-Origin');
    if (allowOrigin && allowOrigin !== '*') ctx.remove('Access-Control-Allow-Origin');
    const body = ctx.body as { error?: unknown } | undefined;
    if (ctx.status >= 400 && body && typeof body === 'object' && typeof body.error === 'string') {
      ctx.body = { error: body.error };
    }
  });
  const host = issuer.host;
  const proto = issuer.protocol.slice(0, -1);
  const callback = provider.callback();

  observe(provider, log);

  return {
    issuer: issuerUrl,
    jwks: () => publicJwks,
    handler(req, res) {
      req.headers.host = host;
      req.headers['x-forwarded-host'] = host;
      req.headers['x-forwarded-proto'] = proto;
      callback(req, res);
    },
  };
}

/**
 * The requested scopes that the client's registered scopes cover. Scope strings that are not SMART
 * resource scopes (`openid`, typos, granular `?` scopes) are never granted.
 */
function grantableScopes(ctx: OidcContext, client: OidcClient): string[] {
  const requested = ctx.oidc.params?.scope;
  const registered = client[CLIENT_SCOPES_METADATA];
  if (typeof requested !== 'string' || !Array.isArray(registered)) return [];
  const allowed = parseSmartScopes(registered as string[]);
  return [...new Set(requested.split(' '))].filter((s) => {
    const parsed = parseSmartScope(s);
    return parsed !== null && covers(allowed, parsed);
  });
}

/** A client may introspect or revoke only the tokens issued to itself. */
function ownTokenOnly(_ctx: OidcContext, client: OidcClient, token: OidcToken): boolean {
  return token.clientId === client.clientId;
}

/**
 * Logs oidc-provider's outcomes by OAuth error code only: its messages and descriptions can carry
 * client input or claims (DESIGN.md rule 4).
 */
function observe(provider: Provider, log: Logger): void {
  const clientOf = (ctx: unknown) => (ctx as OidcContext | undefined)?.oidc?.client?.clientId;
  const codeOf = (err: unknown) => {
    const code = (err as { error?: unknown } | null)?.error;
    return typeof code === 'string' ? code : 'unknown';
  };
  provider.on('grant.success', (ctx) => log.info('oauth.token_issued', { clientId: clientOf(ctx) }));
  for (const event of [
    'grant.error',
    'introspection.error',
    'revocation.error',
    'jwks.error',
    'discovery.error',
    'authorization.error',
    'end_session_confirm.error',
  ]) {
    provider.on(event, (ctx, err) =>
      log.warn(`oauth.${event.replace('.error', '')}_refused`, {
        code: codeOf(err),
        clientId: clientOf(ctx),
      }),
    );
  }
  provider.on('server_error', (_ctx, err) =>
    log.error('oauth.server_error', { code: 'server_error', ...errorFields(err) }),
  );
}

/** The private signing JWKS from `file`, created with one ES256 key when missing. */
function loadSigningKeys(file: string): JSONWebKeySet {
  const text = readOrCreateKeyFile(file, () => {
    const jwk = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
    const key = { ...jwk, kid: randomBytes(12).toString('base64url'), alg: ACCESS_TOKEN_ALG, use: 'sig' };
    return JSON.stringify({ keys: [key] }, null, 2) + '\n';
  });
  let jwks: unknown;
  try {
    jwks = JSON.parse(text);
  } catch {
    throw new CustosError('CONFIG_INVALID');
  }
  const keys = (jwks as { keys?: unknown } | null)?.keys;
  // Every key private, and one usable for ES256 (oidc-provider would otherwise fail at the first token).
  if (
    !Array.isArray(keys) ||
    keys.some((k: JWK) => typeof k?.d !== 'string') ||
    !keys.some(
      (k: JWK) => k.kty === 'EC' && k.crv === 'P-256' && (k.alg ?? ACCESS_TOKEN_ALG) === ACCESS_TOKEN_ALG,
    )
  ) {
    throw new CustosError('CONFIG_INVALID');
  }
  return { keys: keys as JWK[] };
}

/** The public members of a private JWK. */
function publicPart(jwk: JWK): JWK {
  return Object.fromEntries(Object.entries(jwk).filter(([member]) => !PRIVATE_JWK_MEMBERS.includes(member)));
}
