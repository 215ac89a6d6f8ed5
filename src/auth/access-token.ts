import { createLocalJWKSet, jwtVerify, type JSONWebKeySet } from 'jose';
import { CustosError } from '../kernel/errors.ts';

// The access token contract, shared by the authorization server (src/auth/authorization-server.ts)
// that issues the tokens and the verifier below; here so that the resource server does not load oidc-provider.

/** Access token lifetime, seconds. SMART Backend Services: it "SHOULD NOT exceed five minutes". */
export const ACCESS_TOKEN_TTL = 300;
/** The one algorithm our access tokens are signed with, and the only one the verifier accepts. */
export const ACCESS_TOKEN_ALG = 'ES256';

/** The audience of our access tokens: the FHIR base URL under the issuer. */
export function fhirAudience(issuer: string): string {
  return `${new URL(issuer).origin}/fhir/R4`;
}

/** What the resource server learns from a valid access token. */
export interface AccessTokenClaims {
  clientId: string;
  /** The granted scopes, as strings (parse them with src/auth/smart-scopes.ts). */
  scopes: string[];
  /** The token's default purpose of use (claim `purpose_of_use`), if the client has exactly one. */
  purposeOfUse?: string;
  jti?: string;
  /** Expiry, seconds since the epoch. */
  expiresAt: number;
  /** A person's token (authorization code flow): the user, their role, FHIR identity and launch patient. */
  user?: { id: string; role: string; fhirUser?: string; patient?: string };
}

/**
 * Builds the resource server's check of bearer tokens issued by our authorization server: an
 * RFC 9068 JWT (`typ: at+jwt`) signed with one of `jwks()`, issued by `issuer`, for audience
 * `${issuer}/fhir/R4`, unexpired and at most {@link ACCESS_TOKEN_TTL} seconds old.
 *
 * Every failure is `CustosError('UNAUTHENTICATED')` with no detail: telling a caller why a token was
 * refused helps only an attacker (RFC 6750 section 3.1 lets the detail be omitted).
 *
 * @example
 * const verify = createAccessTokenVerifier({ issuer: auth.issuer, jwks: auth.jwks });
 * const { clientId, scopes } = await verify(bearerToken);
 */
export function createAccessTokenVerifier(opts: {
  issuer: string;
  jwks: () => JSONWebKeySet;
}): (token: string) => Promise<AccessTokenClaims> {
  const issuer = new URL(opts.issuer).origin;
  const audience = fhirAudience(issuer);
  let cached: { jwks: JSONWebKeySet; keySet: ReturnType<typeof createLocalJWKSet> } | undefined;

  return async (token) => {
    const jwks = opts.jwks();
    if (cached?.jwks !== jwks) cached = { jwks, keySet: createLocalJWKSet(jwks) };
    try {
      const { payload } = await jwtVerify(token, cached.keySet, {
        issuer,
        audience,
        algorithms: [ACCESS_TOKEN_ALG],
        typ: 'at+jwt',
        maxTokenAge: ACCESS_TOKEN_TTL,
        requiredClaims: ['exp', 'iat'],
      });
      const { client_id: clientId, scope, purpose_of_use: purpose, jti, exp } = payload;
      const { sub, user_role: role, fhirUser, patient } = payload;
      if (typeof clientId !== 'string' || typeof exp !== 'number') throw new Error('claims');
      if (scope !== undefined && typeof scope !== 'string') throw new Error('claims');
      if (purpose !== undefined && typeof purpose !== 'string') throw new Error('claims');
      const optionalString = (v: unknown) => v === undefined || typeof v === 'string';
      if (!optionalString(role) || !optionalString(fhirUser) || !optionalString(patient))
        throw new Error('claims');
      if (role !== undefined && (typeof sub !== 'string' || sub === clientId)) throw new Error('claims');
      return {
        clientId,
        scopes: scope ? scope.split(' ') : [],
        ...(purpose !== undefined ? { purposeOfUse: purpose } : {}),
        ...(jti !== undefined ? { jti } : {}),
        expiresAt: exp,
        ...(role !== undefined
          ? {
              user: {
                id: sub!,
                role: role as string,
                ...(fhirUser !== undefined ? { fhirUser: fhirUser as string } : {}),
                ...(patient !== undefined ? { patient: patient as string } : {}),
              },
            }
          : {}),
      };
    } catch {
      throw new CustosError('UNAUTHENTICATED');
    }
  };
}
