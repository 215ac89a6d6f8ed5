// ESLint rule `custos/no-outbound-client` (issue 7, ADR 0009): outbound connections go through the
// egress gateway (src/egress) only. It catches what `no-restricted-imports` cannot: default and
// namespace imports used for a client (`http.request`, `tls.connect`, `net.Socket`), `require`,
// dynamic `import()`, destructuring, and `globalThis.fetch`. Listeners (`createServer`) and types
// stay allowed.

/** Outbound names per module; `*`: the whole module is an outbound client. */
const OUTBOUND = {
  http: ['request', 'get', 'Agent', 'globalAgent', 'ClientRequest'],
  https: ['request', 'get', 'Agent', 'globalAgent'],
  http2: ['connect'],
  net: ['connect', 'createConnection', 'Socket', 'Stream'],
  tls: ['connect', 'TLSSocket', 'createSecurePair'],
  dgram: ['createSocket'],
  undici: '*',
  'node-fetch': '*',
  axios: '*',
  got: '*',
  ws: '*',
  // An SMTP client opens its own sockets unless given one (src/egress/smtp-mailer.ts gives it one).
  nodemailer: '*',
};
const GLOBAL_OBJECTS = new Set(['globalThis', 'global', 'self', 'window']);
const GLOBAL_CLIENTS = new Set(['fetch', 'WebSocket', 'EventSource', 'XMLHttpRequest']);

function moduleOf(source) {
  if (typeof source !== 'string') return undefined;
  const name = source.startsWith('node:') ? source.slice(5) : source;
  return Object.prototype.hasOwnProperty.call(OUTBOUND, name) ? name : undefined;
}

function isOutbound(mod, name) {
  const names = OUTBOUND[mod];
  return names === '*' || names.includes(name);
}

const MESSAGE = 'Outbound connections go through src/egress (the egress gateway); listeners are fine.';

/** @type {import('eslint').Rule.RuleModule} */
export const noOutboundClient = {
  meta: {
    type: 'problem',
    docs: { description: 'Outbound network clients only in src/egress' },
    schema: [],
    messages: { outbound: MESSAGE },
  },
  create(context) {
    /** Local names bound to a whole outbound module (default, namespace, require). */
    const bound = new Map();
    const report = (node) => context.report({ node, messageId: 'outbound' });
    const checkPattern = (pattern, mod) => {
      if (pattern.type === 'Identifier') {
        if (OUTBOUND[mod] === '*') report(pattern);
        else bound.set(pattern.name, mod);
        return;
      }
      if (pattern.type !== 'ObjectPattern') return;
      for (const p of pattern.properties) {
        const key = p.type === 'Property' && p.key.type === 'Identifier' ? p.key.name : undefined;
        if (key === undefined || isOutbound(mod, key)) report(p);
      }
    };
    const requiredModule = (node) =>
      node &&
      node.type === 'CallExpression' &&
      node.callee.type === 'Identifier' &&
      node.callee.name === 'require' &&
      node.arguments[0]?.type === 'Literal'
        ? moduleOf(node.arguments[0].value)
        : undefined;
    return {
      ImportDeclaration(node) {
        const mod = moduleOf(node.source.value);
        if (!mod || node.importKind === 'type') return;
        for (const s of node.specifiers) {
          if (s.importKind === 'type') continue;
          if (s.type === 'ImportSpecifier') {
            const name = s.imported.type === 'Identifier' ? s.imported.name : s.imported.value;
            if (isOutbound(mod, name)) report(s);
          } else if (OUTBOUND[mod] === '*') report(s);
          else bound.set(s.local.name, mod);
        }
      },
      ImportExpression(node) {
        const src = node.source.type === 'Literal' ? node.source.value : undefined;
        if (moduleOf(src)) report(node);
      },
      VariableDeclarator(node) {
        const mod = requiredModule(node.init);
        if (mod) return checkPattern(node.id, mod);
        if (node.init?.type === 'Identifier' && bound.has(node.init.name))
          checkPattern(node.id, bound.get(node.init.name));
      },
      CallExpression(node) {
        // A bare require('https').request(...) or require('undici') not bound to a name.
        const mod = requiredModule(node);
        if (mod && node.parent.type !== 'VariableDeclarator') {
          const parent = node.parent;
          const prop =
            parent.type === 'MemberExpression' &&
            parent.object === node &&
            parent.property.type === 'Identifier'
              ? parent.property.name
              : undefined;
          if (OUTBOUND[mod] === '*' || prop === undefined || isOutbound(mod, prop)) report(node);
        }
      },
      MemberExpression(node) {
        if (node.object.type !== 'Identifier') return;
        const prop = node.computed
          ? node.property.type === 'Literal'
            ? String(node.property.value)
            : undefined
          : node.property.name;
        const mod = bound.get(node.object.name);
        if (mod) {
          // A computed access we cannot read is refused too: it could be anything.
          if (prop === undefined || isOutbound(mod, prop)) report(node);
          return;
        }
        if (
          GLOBAL_OBJECTS.has(node.object.name) &&
          (prop === undefined ? node.computed : GLOBAL_CLIENTS.has(prop))
        )
          report(node);
      },
    };
  },
};

export default { rules: { 'no-outbound-client': noOutboundClient } };
