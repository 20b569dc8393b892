-- VIP 用户打折
local viplevel = request.body.viplevel or 0
local discount = 1.0

if viplevel >= 3 then
  discount = 0.5  -- 5折
elseif viplevel >= 1 then
  discount = 0.8  -- 8折
end

return {
  prompt_tokens = usage.prompt_tokens,
  completion_tokens = usage.completion_tokens,
  total_tokens = usage.total_tokens,
  billable_tokens = math.floor(usage.total_tokens * discount),
  discount = discount,
  viplevel = viplevel
}
