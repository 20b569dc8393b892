-- 模型名称映射
local model_map = {
  ["gpt-4"] = "llama-3-70b-instruct",
  ["gpt-3.5"] = "qwen-72b-chat"
}

local model = request.body.model
local new_model = model_map[model] or model

-- 修改请求体
local new_body = {}
for k, v in pairs(request.body) do
  new_body[k] = v
end
new_body.model = new_model

-- 添加自定义请求头
local new_headers = {
  ["X-User-ID"] = request.user_id,
  ["X-Original-Model"] = model
}

return {
  body = new_body,
  headers = new_headers
}
