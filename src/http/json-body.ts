import secureJson from 'secure-json-parse';
import { CustosError } from '../kernel/errors.ts';

/** Deepest nesting a request body may have. R4 resources stay far below; 10,000-deep JSON is an attack. */
export const MAX_JSON_DEPTH = 64;

/**
 * Parses a request body: refuses `__proto__`/`constructor.prototype` keys (prototype poisoning)
 * and bodies nested deeper than MAX_JSON_DEPTH, before anything recursive touches them.
 * Errors never carry the parser's message (it quotes the input).
 */
export function parseJsonBody(text: string): unknown {
  checkDepth(text);
  try {
    return secureJson.parse(text, undefined, { protoAction: 'error', constructorAction: 'error' });
  } catch {
    throw new CustosError('INVALID_JSON');
  }
}

/** Scans the text (not the parsed value) so depth is checked without recursion. */
function checkDepth(text: string): void {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c)
        i++; // backslash: skip the escaped character
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x7b || c === 0x5b) {
      if (++depth > MAX_JSON_DEPTH) throw new CustosError('JSON_TOO_DEEP');
    } else if (c === 0x7d || c === 0x5d) depth--;
  }
}
