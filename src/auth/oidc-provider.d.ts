/**
 * The small part of oidc-provider 9's API that Custos uses. The package ships no types and
 * `@types/oidc-provider` is not a dependency; this declares only what src/auth/ calls, so a change
 * in that surface fails type-checking here. Callback arguments are typed where they are used.
 */
declare module 'oidc-provider' {
  import type { IncomingMessage, ServerResponse } from 'node:http';

  export interface AdapterPayload {
    [key: string]: unknown;
    jti?: string;
    grantId?: string;
    userCode?: string;
    uid?: string;
    consumed?: number;
  }

  export interface Adapter {
    upsert(id: string, payload: AdapterPayload, expiresIn: number | undefined): Promise<void>;
    find(id: string): Promise<AdapterPayload | undefined>;
    findByUserCode(userCode: string): Promise<AdapterPayload | undefined>;
    findByUid(uid: string): Promise<AdapterPayload | undefined>;
    consume(id: string): Promise<void>;
    destroy(id: string): Promise<void>;
    revokeByGrantId(grantId: string): Promise<void>;
  }

  export class Provider {
    constructor(issuer: string, configuration?: Record<string, unknown>);
    readonly issuer: string;
    /** Koa's flag: trust X-Forwarded-Proto / X-Forwarded-Host. */
    proxy: boolean;
    callback(): (req: IncomingMessage, res: ServerResponse) => void;
    on(event: string, listener: (...args: unknown[]) => void): this;
    /** Koa middleware, run around every oidc-provider route. */
    use(middleware: (ctx: KoaContext, next: () => Promise<void>) => Promise<void>): void;
    /** The pending interaction of the request (its `_interaction` cookie must match the uid). */
    interactionDetails(req: IncomingMessage, res: ServerResponse): Promise<Interaction>;
    /** Records the result and answers with a 303 back to the authorization endpoint. */
    interactionFinished(
      req: IncomingMessage,
      res: ServerResponse,
      result: Record<string, unknown>,
      options?: { mergeWithLastSubmission?: boolean },
    ): Promise<void>;
    readonly Grant: GrantStatic;
  }

  export interface Interaction {
    uid: string;
    prompt: { name: string; reasons: string[]; details: Record<string, unknown> };
    params: Record<string, unknown>;
    session?: { accountId?: string };
    grantId?: string;
    lastSubmission?: Record<string, unknown>;
  }

  export interface Grant {
    addOIDCScope(scope: string): void;
    addOIDCClaims(claims: string[]): void;
    /** Marks OIDC scopes as seen and refused: the consent prompt stops asking for them. */
    rejectOIDCScope(scope: string): void;
    addResourceScope(resource: string, scope: string): void;
    save(): Promise<string>;
  }
  export interface GrantStatic {
    new (init: { accountId: string; clientId: string }): Grant;
    find(id: string): Promise<Grant | undefined>;
  }

  /** The part of Koa's context our middleware touches. */
  export interface KoaContext {
    status: number;
    type: string;
    body: unknown;
    path: string;
    method: string;
    ip: string;
    query: Record<string, string | string[] | undefined>;
    querystring: string;
    response: { get(field: string): string };
    remove(field: string): void;
    set(field: string, value: string): void;
    get(field: string): string;
    cookies: { get(name: string, opts?: { signed?: boolean }): string | undefined };
    oidc?: {
      client?: { clientId: string; [metadata: string]: unknown };
      params?: Record<string, unknown>;
      session?: { accountId?: string };
      entities?: Record<string, { accountId?: string; scope?: string; grantId?: string } | undefined>;
    };
  }

  export namespace interactionPolicy {
    class Check {
      constructor(
        reason: string,
        description: string,
        check: (ctx: KoaContext) => boolean | Promise<boolean>,
      );
      static REQUEST_PROMPT: true;
      static NO_NEED_TO_PROMPT: false;
    }
    interface Prompt {
      name: string;
      checks: { add(check: Check, index?: number): void };
    }
    interface Policy extends Array<Prompt> {
      get(name: string): Prompt | undefined;
    }
    function base(): Policy;
  }

  class OIDCProviderError extends Error {
    error: string;
    status: number;
    statusCode: number;
    expose: boolean;
  }

  export namespace errors {
    class InvalidScope extends OIDCProviderError {
      constructor(description: string, scope?: string);
    }
    class InvalidTarget extends OIDCProviderError {
      constructor(description?: string);
    }
    class InvalidGrant extends OIDCProviderError {
      constructor(detail?: string);
    }
    class InvalidClientAuth extends OIDCProviderError {
      constructor(detail?: string);
    }
  }
}
