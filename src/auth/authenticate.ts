import { CustosError } from '../kernel/errors.ts';
import { TtlCache } from '../kernel/ttl-cache.ts';
import type { Principal } from '../phi/gateway.ts';
import type { AccessTokenClaims } from './access-token.ts';
import type { ClientRegistration, ClientRegistry } from './client-registry.ts';
import { allows, allowsAnyContext, covers, parseSmartScopes, type SmartScope } from './smart-scopes.ts';
import type { User } from './users.ts';

/** How long a client registration is reused before it is read again: a deactivation or a scope
 * change takes effect within this time. */
export const CLIENT_CACHE_MS = 2000;

interface ClientView {
  client: ClientRegistration;
  registered: SmartScope[];
}

/** How long a person's account state (active, role, project) is reused: a deactivation takes effect within this time. */
export const USER_CACHE_MS = 2000;

/**
 * Turns a bearer token into the Principal the gateway trusts. A verified token is cached until
 * its `exp` (verifying an ES256 signature is the largest CPU cost of a read: docs/bench.md), and the
 * client's registration for CLIENT_CACHE_MS; the client must still be active and the token's scopes
 * still within its registration.
 */
export function createAuthenticator(opts: {
  verify: (token: string) => Promise<AccessTokenClaims>;
  clients: ClientRegistry;
  /** People behind tokens of the authorization code flow; without it such tokens are refused. */
  users?: { find(ref: { userId: string }): Promise<User | undefined> };
  now?: () => number;
}): (bearer: string) => Promise<Principal> {
  const now = opts.now ?? Date.now;
  const tokens = new TtlCache<string, AccessTokenClaims>(10_000, now);
  const clients = new TtlCache<string, ClientView | null>(1_000, now);
  const people = new TtlCache<string, User | null>(10_000, now);

  return async (bearer) => {
    let claims = tokens.get(bearer);
    if (!claims) {
      claims = await opts.verify(bearer);
      tokens.set(bearer, claims, claims.expiresAt * 1000);
    }
    let view = clients.get(claims.clientId);
    if (view === undefined) {
      const client = await opts.clients.find(claims.clientId);
      view = client && client.active ? { client, registered: parseSmartScopes([...client.scopes]) } : null;
      clients.set(claims.clientId, view, now() + CLIENT_CACHE_MS);
    }
    if (!view) throw new CustosError('UNAUTHENTICATED');
    const { client, registered } = view;
    if (claims.user) {
      // A person: still active, in the client's project, in the role the token was issued for.
      const u = claims.user;
      let user = people.get(u.id);
      if (user === undefined) {
        user = (await opts.users?.find({ userId: u.id })) ?? null;
        people.set(u.id, user, now() + USER_CACHE_MS);
      }
      if (!user || !user.active || user.projectId !== client.projectId || user.role !== u.role)
        throw new CustosError('UNAUTHENTICATED');
      // The token's patient and user scopes, each still within the client's registration.
      const scopes = parseSmartScopes(claims.scopes).filter(
        (s) => s.context !== 'system' && covers(registered, s),
      );
      return {
        projectId: client.projectId,
        clientId: client.id,
        userId: user.id,
        userRole: user.role,
        ...(user.fhirUser ? { fhirUser: user.fhirUser } : {}),
        ...(u.patient ? { launchPatient: u.patient } : {}),
        scopes,
        roles: [user.role],
        allowedPurposes: client.purposes,
        // Break-glass for people is decided by their role policy (src/phi/access-policy.ts).
        mayBreakGlass: false,
        tokenPurpose: claims.purposeOfUse,
        can: (type, interaction) => allowsAnyContext(scopes, type, interaction),
      };
    }
    // Effective permission: the token's system scopes, within what the client is registered for now.
    const granted = parseSmartScopes(claims.scopes).filter((s) => s.context === 'system');
    return {
      projectId: client.projectId,
      clientId: client.id,
      roles: ['system'],
      allowedPurposes: client.purposes,
      mayBreakGlass: client.mayBreakGlass,
      tokenPurpose: claims.purposeOfUse,
      can: (type, interaction) =>
        type === '*'
          ? granted.some((s) => s.resourceType === '*' && s[interaction]) &&
            registered.some((s) => s.resourceType === '*' && s[interaction])
          : allows(granted, type, interaction) && allows(registered, type, interaction),
    };
  };
}
