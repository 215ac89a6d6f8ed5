import { randomBytes } from 'node:crypto';
import { BlockList, isIP, isIPv6 } from 'node:net';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { decodeJwt, type JSONWebKeySet } from 'jose';
import { Provider, errors, interactionPolicy, type KoaContext } from 'oidc-provider';
import type { SqlDriver } from '../store/sql-driver.ts';
import { errorFields, type Logger } from '../log/logger.ts';
import { CustosError } from '../kernel/errors.ts';
import { newId } from '../kernel/ids.ts';
import { RateLimiter } from '../kernel/rate-limit.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import type { AuditEvent } from '../audit/audit-event.ts';
import type { ClientRegistry } from './client-registry.ts';
import type { UserService } from './users.ts';
import type { SessionStore } from './sessions.ts';
import { readOrCreateKeyFile } from '../kernel/key-file.ts';
import { loadSigningKeys, publicPart } from './signing-keys.ts';
import { CLIENT_PURPOSES_METADATA, CLIENT_SCOPES_METADATA, createOidcAdapter } from './oidc-adapter.ts';
import { covers, parseSmartScope, parseSmartScopes } from './smart-scopes.ts';
import { ACCESS_TOKEN_ALG, ACCESS_TOKEN_TTL, fhirAudience as audienceOf } from './access-token.ts';
import { LAUNCH_SCOPES, loadLaunchContext } from './smart-launch.ts';
import { createInteractionHandler, SESSION_COOKIE } from './interactions.ts';

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
  /**
   * People and their login sessions: with both, the authorization code flow (SMART App Launch) is
   * served, with login and consent pages at `/oauth/interaction/:uid`. Without, client credentials only.
   */
  users?: UserService;
  sessions?: SessionStore;
  /** Where token issuance and refusals, and refused logins, are audited (fail-closed: no audit, no token). */
  audit?: AuditLog;
  /** Keys for the provider's cookies and our CSRF tokens (created, mode 0600, when missing). */
  cookieKeyFile?: string;
  /** Whether a live Patient with this id exists in the project: the patient picker of a standalone launch. */
  patientExists?: (projectId: string, id: string) => Promise<boolean>;
  /** Login attempts per client address: burst and per-minute refill (default 10 and 10). */
  loginRateLimit?: { capacity: number; perMinute: number };
  /** Token requests per client address (default 60 at once, 600 a minute). */
  tokenRateLimit?: { capacity: number; perMinute: number };
  /**
   * Addresses or CIDR ranges of TLS-terminating proxies (CUSTOS_TRUSTED_PROXIES): only from them is
   * `X-Forwarded-For` believed, for the rate limits and the audit's source address.
   */
  trustedProxies?: readonly string[];
  /** Refresh token lifetime in seconds (default 30 days; rotated at every use). */
  refreshTokenTtl?: number;
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
  oidc: {
    params?: Record<string, unknown>;
    client?: OidcClient;
    entities?: Record<string, { scope?: string } | undefined>;
    result?: { consent?: unknown };
  };
}
interface OidcToken {
  clientId?: string;
  accountId?: string;
  grantId?: string;
  kind?: string;
}

const ROUTES = {
  token: '/oauth/token',
  jwks: '/oauth/jwks',
  introspection: '/oauth/introspect',
  revocation: '/oauth/revoke',
  authorization: '/oauth/authorize',
  // Not served (no userinfo, no logout yet), but kept under /oauth/ so the HTTP layer's mount covers them.
  end_session: '/oauth/logout',
  userinfo: '/oauth/userinfo',
  pushed_authorization_request: '/oauth/par',
};

/**
 * Custos' OAuth 2.0 authorization server, built on oidc-provider (OpenID certified).
 *
 * - Systems: the client credentials grant, authenticated by a client secret (HTTP Basic or form
 *   body) or, as SMART Backend Services specifies, by a signed JWT assertion (`private_key_jwt`,
 *   RS384/ES384, also RS256/ES256):
 *   https://hl7.org/fhir/smart-app-launch/backend-services.html#obtaining-an-access-token
 *   Only `system/` scopes are granted this way.
 * - People, through SMART apps (when `users` and `sessions` are given): the authorization code flow
 *   with PKCE (S256 only, always, for public and confidential apps), login and consent pages
 *   (interactions.ts), rotating refresh tokens for `offline_access`, an id_token with `fhirUser`, and
 *   the launch context (patient, purpose of use) chosen on the consent page in every access token
 *   and in the token response (https://hl7.org/fhir/smart-app-launch/app-launch.html). Only
 *   `patient/` and `user/` scopes are granted this way. Standalone launch only (no EHR launch).
 *
 * Access tokens are JWTs (RFC 9068, `typ: at+jwt`) for audience `${issuer}/fhir/R4`, signed ES256 with
 * a key from `signingKeyFile`, valid {@link ACCESS_TOKEN_TTL} seconds, carrying `client_id`, `scope`
 * and, when the client is registered with exactly one purpose of use, `purpose_of_use`; a person's
 * token also `sub`, `user_role`, `fhirUser`, `patient` and the purpose chosen at consent.
 *
 * Scopes: each requested SMART scope is granted if the client's registered scopes cover it
 * (`system/Patient.rs` under `system/*.cruds`); others are dropped, and the response's `scope` says
 * what was granted (RFC 6749 section 5.1). A request with no grantable scope, or no scope at all, is
 * refused with `invalid_scope`.
 *
 * Every token issued and every token request refused is audited (`authenticate` events); if the
 * audit cannot be written, no token is given (503 `temporarily_unavailable`).
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
  const cookieKeys = opts.cookieKeyFile
    ? loadCookieKeys(opts.cookieKeyFile)
    : [randomBytes(32).toString('base64url')];
  const { log, users, sessions } = opts;
  const people = users !== undefined && sessions !== undefined;
  const tokenLimiter = new RateLimiter(opts.tokenRateLimit ?? { capacity: 60, perMinute: 600 });

  const policy = interactionPolicy.base();
  // A login is good for as long as the person's Custos session (idle timeout, absolute lifetime,
  // deactivation, password reset: sessions.ts), not for as long as oidc-provider's own session.
  policy.get('login')!.checks.add(
    new interactionPolicy.Check('custos_session', 'the Custos login session has ended', async (ctx) => {
      const accountId = ctx.oidc?.session?.accountId;
      if (!accountId || !sessions) return interactionPolicy.Check.REQUEST_PROMPT;
      const sid = ctx.cookies.get(SESSION_COOKIE);
      const check = sid ? await sessions.validate(sid) : undefined;
      return check?.ok && check.session.userId === accountId
        ? interactionPolicy.Check.NO_NEED_TO_PROMPT
        : interactionPolicy.Check.REQUEST_PROMPT;
    }),
  );
  // Consent every time: the purpose of use and the patient are chosen per launch.
  policy
    .get('consent')!
    .checks.add(
      new interactionPolicy.Check('custos_launch', 'the launch context is chosen at every launch', (ctx) =>
        (ctx.oidc as { result?: { consent?: unknown } } | undefined)?.result?.consent
          ? interactionPolicy.Check.NO_NEED_TO_PROMPT
          : interactionPolicy.Check.REQUEST_PROMPT,
      ),
    );

  const provider = new Provider(issuerUrl, {
    adapter: createOidcAdapter(opts.db, opts.clients),
    jwks: privateJwks,
    routes: ROUTES,
    // SMART resource scopes are not static scopes: they are granted per client in getResourceServerInfo below.
    scopes: [...LAUNCH_SCOPES],
    claims: { openid: ['sub'], fhirUser: ['fhirUser'] },
    // `fhirUser` goes into the id_token itself (SMART), not only to a userinfo endpoint we do not serve.
    conformIdTokenClaims: false,
    responseTypes: people ? ['code'] : [],
    // SMART: `launch` (EHR launch) and `aud` (the FHIR base URL the app means to call).
    extraParams: ['launch', 'aud'],
    clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt', 'none'],
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
    // PKCE for every authorization code, confidential apps included (OAuth 2.1); S256 only (the
    // library refuses `plain`).
    pkce: { required: () => true },
    cookies: { keys: cookieKeys },
    findAccount: async (ctx: OidcContext, sub: string) => {
      const user = users ? await users.find({ userId: sub }) : undefined;
      const client = ctx.oidc.client;
      const registration = client ? await opts.clients.find(client.clientId) : undefined;
      if (!user || !user.active || (registration && registration.projectId !== user.projectId))
        return undefined;
      return {
        accountId: user.id,
        claims: () => ({
          sub: user.id,
          ...(user.fhirUser ? { fhirUser: `${fhirAudience}/${user.fhirUser}` } : {}),
        }),
      };
    },
    loadExistingGrant: async (ctx: {
      oidc: { result?: { consent?: { grantId?: string } }; provider: Provider };
    }) => {
      // Only the grant of the consent just given: every launch asks again (see the consent check).
      const grantId = ctx.oidc.result?.consent?.grantId;
      return grantId ? ctx.oidc.provider.Grant.find(grantId) : undefined;
    },
    interactions: {
      url: (_ctx: unknown, interaction: { uid: string }) => `/oauth/interaction/${interaction.uid}`,
      policy,
    },
    rotateRefreshToken: () => true,
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
    extraTokenClaims: async (ctx: OidcContext, token: OidcToken) => {
      if (token.accountId && token.grantId) {
        // A person's token: who, in which role, for which patient and purpose (smart-launch.ts).
        const launch = await loadLaunchContext(opts.db, token.grantId);
        if (!launch) throw new errors.InvalidGrant('the launch context has expired');
        return {
          user_role: launch.role,
          ...(launch.fhirUser ? { fhirUser: launch.fhirUser } : {}),
          ...(launch.patient ? { patient: launch.patient } : {}),
          ...(launch.encounter ? { encounter: launch.encounter } : {}),
          ...(launch.purpose ? { purpose_of_use: launch.purpose } : {}),
        };
      }
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
      Grant: opts.refreshTokenTtl ?? 30 * 24 * 3600,
      IdToken: ACCESS_TOKEN_TTL,
      Interaction: 600,
      RefreshToken: opts.refreshTokenTtl ?? 30 * 24 * 3600,
      Session: 3600,
    },
    // Browser apps may call the token endpoint from the origins of their registered redirect URIs.
    clientBasedCORS: (_ctx: unknown, origin: string, client: { redirectUris?: string[] }) =>
      (client.redirectUris ?? []).some((u) => new URL(u).origin === origin),
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
  provider.use(async (ctx, next) => {
    const isToken = ctx.path === ROUTES.token && ctx.method === 'POST';
    if (isToken) {
      const wait = tokenLimiter.take(ctx.ip || 'unknown');
      if (wait > 0) {
        ctx.status = 429;
        ctx.set('Retry-After', String(wait));
        ctx.set('Cache-Control', 'no-store');
        ctx.body = { error: 'slow_down' };
        await auditToken(ctx, 'refused', 'oauth.rate_limited').catch(() => undefined);
        return;
      }
    }
    if (ctx.path === ROUTES.authorization && ctx.query.aud !== undefined && ctx.query.aud !== fhirAudience) {
      // SMART: the server must refuse an `aud` that is not its FHIR base URL, so that an app tricked
      // into sending a token elsewhere never gets one for us. No redirect: the app may be an impostor.
      ctx.status = 400;
      ctx.type = 'text/plain';
      ctx.body = 'error: invalid_request (aud is not this FHIR server)\n';
      return;
    }
    if (ctx.path === ROUTES.authorization && typeof ctx.query.scope === 'string') {
      // oidc-provider keeps `offline_access` only with prompt=consent (OpenID Connect Core 11); we ask
      // for consent at every launch anyway, so say so and let SMART apps get their refresh token.
      const scopes = ctx.query.scope.split(' ');
      const prompt = typeof ctx.query.prompt === 'string' ? ctx.query.prompt.split(' ') : [];
      if (scopes.includes('offline_access') && !prompt.includes('consent') && !prompt.includes('none')) {
        const q = new URLSearchParams(ctx.querystring);
        q.set('prompt', [...prompt, 'consent'].join(' '));
        ctx.querystring = q.toString();
      }
    }
    await next();
    // oidc-provider reflects the request's Origin in its CORS answer before (and whether or not) it
    // asks clientBasedCORS: keep the header only for an origin of the client's own redirect URIs.
    const allowOrigin = ctx.response.get('Access-Control-Allow-Origin');
    if (allowOrigin && allowOrigin !== '*') {
      const uris = (ctx.oidc?.client as { redirectUris?: string[] } | undefined)?.redirectUris ?? [];
      if (!uris.some((u) => new URL(u).origin === allowOrigin)) ctx.remove('Access-Control-Allow-Origin');
    }
    // oidc-provider's error_description can quote input (a client id, an Origin header): error
    // bodies keep only the OAuth error code.
    const body = ctx.body as { error?: unknown } | undefined;
    if (ctx.status >= 400 && body && typeof body === 'object' && typeof body.error === 'string') {
      ctx.body = { error: body.error };
    }
    if (!isToken) return;
    if (ctx.status === 200 && body && typeof body === 'object' && 'access_token' in body) {
      const issued = body as Record<string, unknown>;
      const claims = decodeJwt(String(issued.access_token));
      // SMART: the launch context also in the token response.
      if (typeof claims.patient === 'string') {
        issued.patient = claims.patient;
        issued.need_patient_banner = true;
      }
      if (typeof claims.encounter === 'string') {
        issued.encounter = claims.encounter;
        issued.fhirContext = [{ reference: `Encounter/${claims.encounter}` }];
      }
      // SMART apps read the granted launch and OpenID scopes (`offline_access`, `openid`) from the
      // response's `scope`; oidc-provider reports only the resource scopes there.
      const grant = ctx.oidc?.entities?.Grant as { getOIDCScope?: () => string } | undefined;
      const oidcScopes = grant?.getOIDCScope?.().split(' ').filter(Boolean) ?? [];
      if (oidcScopes.length && typeof issued.scope === 'string') {
        issued.scope = [...new Set([...oidcScopes, ...issued.scope.split(' ')])].join(' ');
      }
      try {
        await auditToken(ctx, 'success', 'token.issued', claims);
      } catch (e) {
        log.error('oauth.audit_failed', errorFields(e));
        ctx.status = 503;
        ctx.body = { error: 'temporarily_unavailable' };
      }
    } else if (ctx.status >= 400) {
      const code =
        typeof (ctx.body as { error?: unknown })?.error === 'string'
          ? (ctx.body as { error: string }).error
          : 'error';
      await auditToken(ctx, 'refused', `oauth.${code}`).catch((e: unknown) =>
        log.error('oauth.audit_failed', errorFields(e)),
      );
    }
  });

  /** One `authenticate` audit event for a token request: who (client, user), what, never a secret. */
  async function auditToken(
    ctx: KoaContext,
    outcome: 'success' | 'refused',
    code: string,
    claims?: Record<string, unknown>,
  ): Promise<void> {
    if (!opts.audit) return;
    const clientId = ctx.oidc?.client?.clientId;
    const registration = clientId ? await opts.clients.find(clientId) : undefined;
    const userId = typeof claims?.sub === 'string' && claims.sub !== clientId ? claims.sub : undefined;
    const event: AuditEvent = {
      v: 1,
      id: newId(),
      time: new Date().toISOString(),
      phase: 'access',
      action: 'authenticate',
      outcome,
      code,
      requestId: newId(),
      ...(registration ? { projectId: registration.projectId } : {}),
      actor: {
        ...(clientId ? { clientId } : {}),
        ...(userId ? { userId } : {}),
        ...(typeof claims?.user_role === 'string' ? { roles: [claims.user_role] } : {}),
      },
      ...(typeof claims?.purpose_of_use === 'string' ? { purposeOfUse: claims.purpose_of_use } : {}),
      source: { ip: ctx.ip },
    };
    await opts.audit.append(event);
  }

  const trusted = opts.trustedProxies?.length ? new BlockList() : undefined;
  for (const p of opts.trustedProxies ?? []) {
    const [address, prefix] = p.split('/');
    const type = isIPv6(address!) ? 'ipv6' : 'ipv4';
    if (prefix === undefined) trusted!.addAddress(address!, type);
    else trusted!.addSubnet(address!, Number(prefix), type);
  }
  const host = issuer.host;
  const proto = issuer.protocol.slice(0, -1);
  const callback = provider.callback();
  const interactions =
    people && opts.patientExists
      ? createInteractionHandler({
          provider,
          db: opts.db,
          clients: opts.clients,
          users,
          sessions,
          csrfKey: Buffer.from(cookieKeys[0]!, 'base64url'),
          secureCookies: issuer.protocol === 'https:',
          origin: issuerUrl,
          loginLimiter: new RateLimiter(opts.loginRateLimit ?? { capacity: 10, perMinute: 10 }),
          log,
          patientExists: opts.patientExists,
        })
      : undefined;

  observe(provider, log);

  return {
    issuer: issuerUrl,
    jwks: () => publicJwks,
    handler(req, res) {
      // Koa (proxy = true) would believe any X-Forwarded-For: replace it with the address we trust,
      // so that a client cannot dodge the rate limits or forge the audit's source address.
      req.headers['x-forwarded-for'] = clientAddress(req, trusted);
      req.headers.host = host;
      req.headers['x-forwarded-host'] = host;
      req.headers['x-forwarded-proto'] = proto;
      if (interactions && (req.url ?? '').startsWith('/oauth/interaction/')) {
        void interactions(req, res);
        return;
      }
      callback(req, res);
    },
  };
}

/**
 * The requested scopes that the client's registered scopes cover. Scope strings that are not SMART
 * resource scopes (`openid`, typos) are never granted here. The client credentials grant gets only
 * `system/` scopes; the authorization code flow (a person) only `patient/` and `user/` scopes.
 * At the token endpoint of a code or refresh grant, the scope is the code's or refresh token's.
 */
function grantableScopes(ctx: OidcContext, client: OidcClient): string[] {
  const entities = ctx.oidc.entities ?? {};
  const requested =
    ctx.oidc.params?.scope ?? entities.AuthorizationCode?.scope ?? entities.RefreshToken?.scope;
  const registered = client[CLIENT_SCOPES_METADATA];
  if (typeof requested !== 'string' || !Array.isArray(registered)) return [];
  const system = ctx.oidc.params?.grant_type === 'client_credentials';
  const allowed = parseSmartScopes(registered as string[]);
  return [...new Set(requested.split(' '))].filter((s) => {
    const parsed = parseSmartScope(s);
    return parsed !== null && (parsed.context === 'system') === system && covers(allowed, parsed);
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

/** The keys of the provider's signed cookies (and our CSRF tokens), created with one key when missing. */
function loadCookieKeys(file: string): string[] {
  const text = readOrCreateKeyFile(
    file,
    () => JSON.stringify({ keys: [randomBytes(32).toString('base64url')] }) + '\n',
  );
  try {
    const keys = (JSON.parse(text) as { keys?: unknown }).keys;
    if (Array.isArray(keys) && keys.length > 0 && keys.every((k) => typeof k === 'string' && k.length >= 32))
      return keys as string[];
  } catch {
    // Reported below.
  }
  throw new CustosError('CONFIG_INVALID');
}

/**
 * The client's address: the socket's, or, when the socket is a trusted proxy, the right-most
 * `X-Forwarded-For` entry that is not itself a trusted proxy (and is an IP address at all).
 */
function clientAddress(req: IncomingMessage, trusted: BlockList | undefined): string {
  const remote = (req.socket.remoteAddress ?? 'unknown').replace(/^::ffff:/, '');
  const isTrusted = (a: string) =>
    trusted !== undefined && isIP(a) !== 0 && trusted.check(a, isIPv6(a) ? 'ipv6' : 'ipv4');
  if (!isTrusted(remote)) return remote;
  const hops = String(req.headers['x-forwarded-for'] ?? '')
    .split(',')
    .map((a) => a.trim().replace(/^::ffff:/, ''))
    .filter(Boolean);
  for (let i = hops.length - 1; i >= 0; i--) {
    // Not an address (garbage, or text planted to reach a log): the proxy's own address instead.
    if (isIP(hops[i]!) === 0) return remote;
    if (!isTrusted(hops[i]!)) return hops[i]!;
  }
  return remote;
}
