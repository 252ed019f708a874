import fc from 'fast-check';

/**
 * Generated hostile inputs, shared by unit, integration and browser tests: a hand-picked list once
 * hid `/.//evil.example`, which a URL parser normalises into the protocol-relative `//evil.example`.
 */

const RETURN_TO_PIECES = ['/', '.', '..', ';', '%', '%2e', '%2E', '%2f', '%2F', '%5c', '%5C', '\\', '@', ':', '//', '?', '#', '%25', '%09', '\t', 'evil.example', 'a', 'http:', 'javascript:'];

/** Concatenations of what URL parsers treat specially, mostly starting like a path. */
export const hostileReturnTo = fc
  .tuple(fc.constantFrom('/', '', '/.', '/..', '\\', '//'), fc.array(fc.constantFrom(...RETURN_TO_PIECES), { maxLength: 12 }))
  .map(([head, rest]) => head + rest.join(''));
